"""Which stored objects rows refer to, and removing the ones nothing refers to.

Objects are content-addressed, so one object may back several rows (versions of different
experts, datasets of different users). An object is removed only when no row names it, under
the key's lock (``StoredObject``), which publishing takes too. Deletes happen right after the
rows go (``discard_unused``), and a periodic sweep (``sweep``, the beat task
``registry.sweep_storage`` and ``manage.py sweep_storage``) removes what slipped through:
files of writes that never got their row, of workers killed halfway, of deletes that failed
while storage was down.
"""

import logging
from datetime import timedelta

from django.apps import apps
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import storage

logger = logging.getLogger(__name__)

# (model, field) pairs whose values are object keys, by key prefix.
REFERENCES = {
    "experts/": ("registry.ExpertVersion", "artifact_key"),
    "datasets/": ("training.Dataset", "file_key"),
    "checkpoints/": ("training.TrainingJob", "checkpoint_key"),
}


def _rows(key):
    label, field = next(ref for prefix, ref in REFERENCES.items() if key.startswith(prefix))
    return apps.get_model(label).objects.filter(**{field: key})


def locked(key):
    """Inside a transaction: take ``key``'s lock row (made if missing) until it commits."""
    StoredObject = apps.get_model("registry", "StoredObject")
    while True:  # a delete that held the row may have removed it: make it again
        StoredObject.objects.bulk_create([StoredObject(key=key)], ignore_conflicts=True)
        lock = StoredObject.objects.select_for_update().filter(key=key).first()
        if lock is not None:
            return lock


def store(key, fileobj, *, sha256=None):
    """Inside the transaction that writes the row naming ``key``: store ``fileobj`` under it,
    holding the key's lock. Returns whether this call created the stored object."""
    locked(key)  # a delete of the same bytes waits for the commit, or went first
    return storage.put(key, fileobj, sha256=sha256)


def discard_unused(key):
    """Remove the object under ``key`` if no row names it; True if it was removed."""
    with transaction.atomic():
        lock = locked(key)
        if _rows(key).exists() or not storage.delete(key):
            return False
        lock.delete()
    return True


def sweep(now=None, dry_run=False):
    """Remove every stored object that no row names and that is older than
    LATENTRY_SWEEP_GRACE_S (a newer one may be a write whose row is about to commit); also
    the checkpoints of jobs that ended longer ago than that (kept for a retry meanwhile).
    Returns the keys removed (or, with ``dry_run``, that would be)."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.LATENTRY_SWEEP_GRACE_S)
    removed = []
    for prefix, (label, field) in REFERENCES.items():
        named = set(apps.get_model(label).objects.values_list(field, flat=True))
        for key in _stored_keys(prefix):
            if key in named or _modified(key) > cutoff:
                continue
            if key.rpartition("/")[2].startswith(storage.PARTIAL_PREFIX):  # a write that died
                if not dry_run:
                    storage.delete(key)
                removed.append(key)
            elif dry_run or discard_unused(key):
                removed.append(key)
    removed += _ended_jobs_checkpoints(cutoff, dry_run)
    if removed:
        logger.info("sweep removed %d unreferenced objects", len(removed))
    return removed


def _ended_jobs_checkpoints(cutoff, dry_run):
    TrainingJob = apps.get_model("training", "TrainingJob")
    ended = TrainingJob.objects.filter(finished_at__lt=cutoff).exclude(checkpoint_key="")
    keys = []
    for pk, key in ended.values_list("pk", "checkpoint_key"):
        # only if the job is still that ended run (not retried and checkpointing meanwhile)
        if dry_run or TrainingJob.drop_checkpoint(pk, key, finished_at__lt=cutoff):
            keys.append(key)
    return keys


def _stored_keys(prefix):
    """Every key under ``prefix`` (one level of folders: keys are flat within it)."""
    try:
        _, files = storage.artifacts().listdir(prefix)
    except FileNotFoundError:
        return []
    except storage.STORAGE_ERRORS as exc:
        raise storage.StorageUnavailable(f"artifact storage failed: {exc}") from exc
    return [prefix + name for name in files]


def _modified(key):
    try:
        return storage.artifacts().get_modified_time(key)
    except FileNotFoundError:
        return timezone.now()  # gone meanwhile: nothing to do
