"""Artifact storage: local folder or S3, chosen by settings (STORAGES["artifacts"]).

Keys are content-addressed (``experts/<sha256>.safetensors``), so the same bytes are stored
once; an object already under a key is trusted only when its size and sha256 match, and local
writes are all or nothing (``AtomicFileSystemStorage``). Errors of the backend become
StorageUnavailable, which the API answers with 503.
"""

import hashlib
import logging
import os
import tempfile

from asgiref.sync import sync_to_async
from botocore.exceptions import BotoCoreError, ClientError
from django.core.files import File
from django.core.files.storage import FileSystemStorage, storages
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


PARTIAL_PREFIX = ".partial-"  # a local write in progress, or one that died halfway


class AtomicFileSystemStorage(FileSystemStorage):
    """Local disk, all or nothing: a file is written under a temporary name in its folder and
    renamed into place, so a write that fails halfway leaves nothing under the key (Django's
    own writes the key's file directly). An existing file is replaced: keys name content."""

    def __init__(self, **options):
        super().__init__(**{"allow_overwrite": True, **options})

    def _save(self, name, content):
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=PARTIAL_PREFIX)
        try:
            with os.fdopen(handle, "wb") as out:
                for chunk in content.chunks():
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        return str(name).replace("\\", "/")


def put(key, fileobj, *, sha256=None):
    """Store ``fileobj`` under ``key`` unless those bytes are already there: an object under
    the key counts only if its size, and its sha256 when given, match (a truncated or
    corrupted one is replaced).

    Returns True if this call created the object (so a failed publish should remove it).
    """
    storage = artifacts()
    size = fileobj.seek(0, os.SEEK_END)
    try:
        replacing = storage.exists(key)
        if replacing and _holds(storage, key, size, sha256):
            return False
        if replacing:
            logger.warning("artifact %s does not match its content: storing it again", key)
        fileobj.seek(0)
        storage.save(key, File(fileobj))  # both backends write over the key, all or nothing
    except STORAGE_ERRORS as exc:
        raise StorageUnavailable(f"artifact storage failed: {exc}") from exc
    return not replacing  # rows may name a replaced key already: it is theirs too


def _holds(storage, key, size, sha256):
    """Whether the object under ``key`` has this size and, when given, this sha256."""
    if storage.size(key) != size:
        return False
    if sha256 is None:
        return True
    with storage.open(key, "rb") as stored:
        return sha256_of(stored) == sha256


def delete(key):
    """Remove the object under ``key``; False (logged) if storage failed."""
    try:
        artifacts().delete(key)
    except STORAGE_ERRORS:
        logger.exception("could not delete artifact %s", key)
        return False
    return True


def open_artifact(key):
    try:
        return artifacts().open(key, "rb")
    except FileNotFoundError:
        raise
    except STORAGE_ERRORS as exc:
        raise StorageUnavailable(f"artifact storage failed: {exc}") from exc


def download_response(key, filename, asynchronous=False):
    """A presigned redirect on S3, a streamed file on local disk. ``asynchronous``: the
    response is served by an ASGI server, which streams an async iterator without a thread (a
    file's own, synchronous, iterator makes Django warn and copy it in memory)."""
    storage = artifacts()
    if is_s3():
        disposition = f'attachment; filename="{filename}"'
        try:
            url = storage.url(key, parameters={"ResponseContentDisposition": disposition})
        except STORAGE_ERRORS as exc:
            raise StorageUnavailable(f"artifact storage failed: {exc}") from exc
        return HttpResponseRedirect(url)
    file = open_artifact(key)
    response = FileResponse(file, as_attachment=True, filename=filename)  # sets the headers
    if asynchronous:
        response.streaming_content = _read_async(file, response.block_size)
    return response


async def _read_async(file, size):
    read, close = (sync_to_async(f, thread_sensitive=False) for f in (file.read, file.close))
    try:
        while chunk := await read(size):
            yield chunk
    finally:
        await close()
