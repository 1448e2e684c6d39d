"""Artifact storage: local folder or S3, chosen by settings (STORAGES["artifacts"]).

Keys are content-addressed (``experts/<sha256>.safetensors``), so the same bytes are stored
once. Errors of the backend become StorageUnavailable, which the API answers with 503.
"""

import hashlib
import logging

from botocore.exceptions import BotoCoreError, ClientError
from django.core.files import File
from django.core.files.storage import storages
from django.http import FileResponse, HttpResponseRedirect

logger = logging.getLogger(__name__)


class StorageUnavailable(Exception):
    """The artifact store could not be reached or refused the operation."""


STORAGE_ERRORS = (OSError, BotoCoreError, ClientError)


def artifacts():
    return storages["artifacts"]


def is_s3():
    return hasattr(artifacts(), "bucket_name")


def content_key(sha256, prefix="experts", suffix=".safetensors"):
    return f"{prefix}/{sha256}{suffix}"


def sha256_of(fileobj, chunk_size=1024 * 1024):
    """Hash a file object chunk by chunk, leaving it at position 0."""
    digest = hashlib.sha256()
    fileobj.seek(0)
    while chunk := fileobj.read(chunk_size):
        digest.update(chunk)
    fileobj.seek(0)
    return digest.hexdigest()


def put(key, fileobj):
    """Store ``fileobj`` under ``key`` unless that content is already there.

    Returns True if this call created the object (so a failed publish should remove it).
    """
    storage = artifacts()
    try:
        if storage.exists(key):
            return False
        fileobj.seek(0)
        saved = storage.save(key, File(fileobj))
    except STORAGE_ERRORS as exc:
        raise StorageUnavailable(f"artifact storage failed: {exc}") from exc
    if saved != key:
        # Another upload of the same bytes got there first and the local backend picked a
        # new name: drop our copy, theirs is identical.
        storage.delete(saved)
        return False
    return True


def delete(key):
    try:
        artifacts().delete(key)
    except STORAGE_ERRORS:
        logger.exception("could not delete artifact %s", key)


def open_artifact(key):
    try:
        return artifacts().open(key, "rb")
    except FileNotFoundError:
        raise
    except STORAGE_ERRORS as exc:
        raise StorageUnavailable(f"artifact storage failed: {exc}") from exc


def download_response(key, filename):
    """A presigned redirect on S3, a streamed file on local disk."""
    storage = artifacts()
    if is_s3():
        disposition = f'attachment; filename="{filename}"'
        try:
            url = storage.url(key, parameters={"ResponseContentDisposition": disposition})
        except STORAGE_ERRORS as exc:
            raise StorageUnavailable(f"artifact storage failed: {exc}") from exc
        return HttpResponseRedirect(url)
    return FileResponse(open_artifact(key), as_attachment=True, filename=filename)
