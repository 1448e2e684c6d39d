"""Artifact storage writes are all or nothing, and an object under a content key counts only
when its bytes match (local disk and the S3 endpoint alike)."""

import hashlib
import io
import os

import pytest
from django.core.files.base import ContentFile

from registry import storage

DATA = os.urandom(300 * 1024)  # several chunks
SHA256 = hashlib.sha256(DATA).hexdigest()
KEY = storage.content_key(SHA256)


class FailingHalfway(io.BytesIO):
    """A file whose reads fail once half of it was read: a disk or connection lost mid-write."""

    def read(self, size=-1):
        if self.tell() >= len(DATA) // 2:
            raise OSError("the connection was lost")
        return super().read(size)


def stored_bytes(key):
    with storage.open_artifact(key) as f:
        return f.read()


def leftovers():
    """Files under the local artifacts folder (temporary names included); none on S3."""
    artifacts = storage.artifacts()
    if storage.is_s3():
        return []
    return [name for _, _, names in os.walk(artifacts.location) for name in names]


@pytest.mark.django_db
def test_a_write_that_fails_halfway_leaves_nothing_and_the_bytes_store_later(artifact_backend):
    with pytest.raises(storage.StorageUnavailable):
        storage.put(KEY, FailingHalfway(DATA), sha256=SHA256)
    assert not storage.artifacts().exists(KEY)
    assert leftovers() == []  # no truncated file, no temporary one
    assert storage.put(KEY, io.BytesIO(DATA), sha256=SHA256) is True
    assert stored_bytes(KEY) == DATA
    assert storage.put(KEY, io.BytesIO(DATA), sha256=SHA256) is False  # there, and it matches


@pytest.mark.django_db
@pytest.mark.parametrize(
    "damaged", [DATA[: len(DATA) // 2], bytes(len(DATA))], ids=["truncated", "corrupted"]
)
def test_an_object_whose_bytes_do_not_match_is_stored_again(artifact_backend, damaged):
    storage.artifacts().save(KEY, ContentFile(damaged))  # what an older, broken write left
    assert storage.put(KEY, io.BytesIO(DATA), sha256=SHA256) is False  # not created: repaired
    assert stored_bytes(KEY) == DATA
