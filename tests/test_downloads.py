"""Downloading a version from the serving process (ASGI): streamed, whole, without Django's
warning about synchronous iterators (which also means the file is read into memory)."""

import hashlib
import warnings

import requests


def test_a_download_under_asgi_streams_the_whole_file_without_a_warning(
    asgi_server, make_expert, publish
):
    version = publish(make_expert("dl"))
    url = f"{asgi_server}/api/v1/experts/alice/dl/versions/{version.number}/download/"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        response = requests.get(url, timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Disposition"].startswith("attachment")
    assert int(response.headers["Content-Length"]) == version.size
    assert hashlib.sha256(response.content).hexdigest() == version.sha256
    assert not [w for w in caught if "synchronous iterators" in str(w.message)]
