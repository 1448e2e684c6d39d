"""What a worker process keeps between jobs: its device and the base models it loaded."""

import functools

from django.conf import settings

from coprocessor import base_models
from coprocessor.artifact import ArtifactError
from coprocessor.expert import Coprocessor


class JobError(Exception):
    """A job cannot run as asked; the message is shown to the user as the job's error."""


def device():
    return settings.LATENTRY_DEVICE or base_models.default_device()


def base_model(record, device):
    """(decoder, tokenizer) for a registry BaseModel, loaded once per process and device."""
    if not record.weights_location:
        raise JobError(f"base model {record.slug} has no local weights; import it on the worker")
    return _load(record.weights_location, record.fingerprint, device)


@functools.lru_cache(maxsize=2)
def _load(weights_location, fingerprint, device):
    try:
        return base_models.load_verified(weights_location, fingerprint, device=device)
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot load the base model from {weights_location}: {exc}") from exc


def load_version(version, decoder):
    """The expert of an ExpertVersion, read from storage with its sha256 checked and its header
    checked against its base model, as serving does; a file that fails its checks rejects the
    version (the same bytes would fail every time)."""
    try:
        spec = version.expert.base_model.spec()
        return Coprocessor.from_bytes(decoder, version.read_verified(), spec)
    except ArtifactError as exc:
        version.reject(str(exc))
        raise
