"""Dataset files: validated on the way in, stored content-addressed, read back as documents."""

import functools
from pathlib import Path

from celery import current_app
from django.conf import settings
from django.db import IntegrityError, transaction

from coprocessor import corpus
from registry import quotas, references, storage, uploads

from .models import Dataset


class DatasetError(ValueError):
    """The file is not a usable dataset; the message says why."""


class NameTaken(Exception):
    """The owner already has a dataset of that name."""

    def __init__(self, name):
        super().__init__(f"you already have a dataset named {name!r}")


def format_of(filename, declared=""):
    if declared:
        return declared
    return Dataset.JSONL if Path(filename or "").suffix.lower() == ".jsonl" else Dataset.TEXT


def parse(data, fmt):
    """Documents of a dataset file's bytes, or DatasetError naming the problem."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"not UTF-8 text: invalid byte at offset {exc.start}") from None
    try:
        texts = corpus.parse_texts(text, jsonl=fmt == Dataset.JSONL)
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DatasetError("the file holds no text")
    return texts


def create(owner, name, fileobj, *, sha256, size, fmt, base_model=None, **fields):
    """Validate, store and record a dataset. Nothing is stored if validation fails, the name
    is taken (NameTaken: checked first, so a taken name costs no parsing) or the owner's
    storage quota is full (QuotaExceeded)."""
    if Dataset.objects.filter(owner=owner, name=name).exists():
        raise NameTaken(name)
    quotas.check_room(owner, size, lock=False)  # fail fast, before parsing
    described = describe_file(fileobj, sha256=sha256, size=size, fmt=fmt, base_model=base_model)
    key, created = described["file_key"], False
    try:
        with transaction.atomic():
            created = store(fileobj, described)
            quotas.check_room(owner, size)  # again, locked until the commit below
            dataset = Dataset.objects.create(owner=owner, name=name, **described, **fields)
            count_later(dataset)
            return dataset
    except IntegrityError:  # the same name, created meanwhile
        if created:
            references.discard_unused(key)
        raise NameTaken(name) from None
    except BaseException:
        if created:  # never a file that was there before this upload
            references.discard_unused(key)
        raise


def create_from_upload(owner, name, upload, fmt="", **fields):
    """``create`` for an uploaded file: its hash from the upload, its format from its name
    unless ``fmt`` says."""
    return create(
        owner,
        name,
        upload,
        sha256=uploads.sha256_of(upload),
        size=upload.size,
        fmt=format_of(upload.name, fmt),
        **fields,
    )


def store(fileobj, described):
    """Inside the transaction that saves the row: store a described file under its key.
    Returns whether this call created the stored object."""
    return references.store(described["file_key"], fileobj, sha256=described["sha256"])


def describe_file(fileobj, *, sha256, size, fmt, base_model=None):
    """Validate a dataset file; returns the Dataset fields that describe it (``file_key``: where
    ``create`` stores it)."""
    if problem := Dataset.size_problem(size, getattr(fileobj, "too_large", False)):
        raise DatasetError(problem)
    fileobj.seek(0)
    texts = parse(fileobj.read(), fmt)
    suffix = ".jsonl" if fmt == Dataset.JSONL else ".txt"
    key = storage.content_key(sha256, "datasets", suffix)
    # Tokenizing a large file takes a while: a worker counts (count_later), not the request.
    inline = base_model is not None and size <= settings.LATENTRY_INLINE_TOKENIZE_BYTES
    token_count = count_tokens(base_model, texts) if inline else None
    return dict(
        format=fmt,
        file_key=key,
        sha256=sha256,
        size=size,
        documents=len(texts),
        base_model=base_model,
        token_count=token_count,
    )


def count_later(dataset):
    """Queue the token count of a dataset whose upload was too large to count inline."""
    if dataset.base_model_id is not None and dataset.token_count is None:
        task = current_app.tasks["training.count_dataset_tokens"]  # by name: tasks import us
        pk, queue = dataset.pk, settings.LATENTRY_MAINTENANCE_QUEUE
        transaction.on_commit(lambda: task.apply_async((pk,), queue=queue))


def read_texts(dataset):
    with storage.open_artifact(dataset.file_key) as f:
        return parse(f.read(), dataset.format)


def count_tokens(base_model, texts):
    """Tokens of ``texts`` under the base model's tokenizer; None if it has no local copy."""
    tokenizer = tokenizer_for(base_model.weights_location)
    if tokenizer is None:
        return None
    return len(corpus.tokenize(tokenizer, texts))


@functools.lru_cache(maxsize=8)
def tokenizer_for(weights_location):
    if not weights_location or not Path(weights_location).is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(weights_location)
