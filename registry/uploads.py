"""Upload handlers that hash files as they stream in and stop keeping bytes past the limit.

Django hands each chunk of a multipart file to these handlers as it arrives, so the sha256 is
known when the request is parsed and no file is ever read whole into memory.
"""

import hashlib

from django.conf import settings
from django.core.files.uploadhandler import MemoryFileUploadHandler, TemporaryFileUploadHandler

from . import storage


def sha256_of(upload):
    """An upload's sha256: hashed as it streamed in, or (a file from elsewhere) read now."""
    return getattr(upload, "sha256", None) or storage.sha256_of(upload)


def over_limit(upload, limit):
    """Whether an upload is over ``limit`` bytes (the handlers stop keeping bytes past it)."""
    return getattr(upload, "too_large", False) or upload.size > limit


class HashingMixin:
    def new_file(self, *args, **kwargs):
        # Set up before super(): the memory handler raises StopFutureHandlers from new_file.
        self.sha256 = hashlib.sha256()
        self.received = 0
        self.too_large = False
        super().new_file(*args, **kwargs)

    def stores_data(self):
        return getattr(self, "activated", True)

    def receive_data_chunk(self, raw_data, start):
        if not self.stores_data():
            return raw_data
        self.received += len(raw_data)
        if self.received > settings.LATENTRY_MAX_ARTIFACT_BYTES:
            self.too_large = True
            return None  # drain the request, keep nothing more
        self.sha256.update(raw_data)
        return super().receive_data_chunk(raw_data, start)

    def file_complete(self, file_size):
        if not self.stores_data():
            return None
        uploaded = super().file_complete(file_size)
        if uploaded is not None:
            uploaded.sha256 = self.sha256.hexdigest()
            uploaded.too_large = self.too_large
        return uploaded


class HashingMemoryFileUploadHandler(HashingMixin, MemoryFileUploadHandler):
    pass


class HashingTemporaryFileUploadHandler(HashingMixin, TemporaryFileUploadHandler):
    pass
