"""Stored objects: checkpoints go with their job however it ends, the sweep removes what no row
names, and a delete racing a publish of the same bytes never loses them."""

import hashlib
import io
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from coprocessor.train import Cancelled
from registry import references, storage
from registry.models import ExpertVersion
from registry.storage import StorageUnavailable
from tests.factories import SMALL_JOB, make_dataset, stored_keys, upload
from training import tasks
from training.models import Job, TrainingJob


@pytest.fixture
def words(alice, base_model):
    return make_dataset(alice, base_model=base_model)


@pytest.fixture
def checkpointed(alice, words, make_expert):
    """A queued job whose checkpoint is stored."""
    job = TrainingJob.start(alice, make_expert("ck"), [words], SMALL_JOB)
    key = f"checkpoints/training-job-{job.pk}-attempt-1-step-10.pt"
    storage.put(key, io.BytesIO(b"optimizer state"))
    TrainingJob.objects.filter(pk=job.pk).update(checkpoint_key=key)
    job.refresh_from_db()
    return job


def gave_up(job, settings):
    settings.LATENTRY_JOB_MAX_ATTEMPTS = 1
    TrainingJob.objects.filter(pk=job.pk).update(attempts=1)
    TrainingJob.claim(job.pk, "w@host", "cpu")


def run_raising(error):
    """Run the job through the task, its training raising ``error`` (how each ending reaches
    the worker)."""

    def ending(job, monkeypatch, settings, **_):
        def work(job, device):
            raise error

        settings.LATENTRY_JOB_STORAGE_RETRIES = 0
        monkeypatch.setattr(tasks.runner, "run_training", work)
        tasks.train_expert.apply((job.pk,))
        assert TrainingJob.objects.get(pk=job.pk).finished

    return ending


ENDINGS = {
    "succeeded": lambda job, **_: job.finish(Job.SUCCEEDED),
    "failed-bad-input": run_raising(ValueError("bad data")),
    "cancelled-running": run_raising(Cancelled("cancelled at step 3")),
    "time-limit": run_raising(SoftTimeLimitExceeded()),
    "storage-down": run_raising(StorageUnavailable("bucket unreachable")),
    "worker-error": run_raising(RuntimeError("the worker broke")),
    "cancelled-queued": lambda job, **_: job.request_cancel(),
    "gave-up": lambda job, settings, **_: gave_up(job, settings),
    "job-deleted": lambda job, **_: job.delete(),
    "expert-deleted": lambda job, **_: job.expert.delete_with_artifacts(),
}


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_checkpoint_goes_however_its_job_ends(
    checkpointed, ending, settings, monkeypatch, django_capture_on_commit_callbacks
):
    key = checkpointed.checkpoint_key
    with django_capture_on_commit_callbacks(execute=True):
        ENDINGS[ending](checkpointed, settings=settings, monkeypatch=monkeypatch)
    assert key not in stored_keys()
    left = TrainingJob.objects.filter(pk=checkpointed.pk).first()
    assert left is None or (left.finished and not left.checkpoint_key)


def test_the_sweep_removes_old_objects_that_no_row_names(
    artifact_backend, settings, alice_client, make_expert, expert_file, words
):
    version_key = upload(alice_client, make_expert(), expert_file()).json()["sha256"]
    kept = {f"experts/{version_key}.safetensors", words.file_key}
    orphans = {
        f"experts/{'0' * 64}.safetensors",
        f"datasets/{'1' * 64}.txt",
        "checkpoints/training-job-999-attempt-1-step-10.pt",
    }
    for key in orphans:
        storage.put(key, io.BytesIO(b"left behind"))
    if artifact_backend == "filesystem":  # a local write that died halfway
        partial = Path(settings.STORAGES["artifacts"]["OPTIONS"]["location"], "experts")
        (partial / ".partial-x1y2").write_bytes(b"half")
        orphans.add("experts/.partial-x1y2")
    assert references.sweep() == []  # all young: a write may be about to get its row
    later = timezone.now() + timedelta(seconds=settings.LATENTRY_SWEEP_GRACE_S + 60)
    assert sorted(references.sweep(now=later, dry_run=True)) == sorted(orphans)
    assert set(stored_keys()) >= orphans  # a dry run removes nothing
    assert sorted(references.sweep(now=later)) == sorted(orphans)
    assert set(stored_keys()) == kept


def test_the_sweep_command_lists_what_it_removes(settings, alice):
    settings.LATENTRY_SWEEP_GRACE_S = -60  # everything counts as old
    storage.put("checkpoints/training-job-1-attempt-1-step-1.pt", io.BytesIO(b"x"))
    out = io.StringIO()
    call_command("sweep_storage", "--dry-run", stdout=out)
    assert "checkpoints/training-job-1" in out.getvalue() and "would remove 1" in out.getvalue()
    call_command("sweep_storage", stdout=io.StringIO())
    assert stored_keys() == []


@pytest.mark.skipif(
    "sqlite" in settings.DATABASES["default"]["ENGINE"],
    reason="SQLite serialises every write transaction itself; the race needs PostgreSQL (CI)",
)
@pytest.mark.django_db(transaction=True)
def test_a_delete_racing_a_publish_of_the_same_bytes_never_loses_them(
    artifact_backend, alice, make_expert, expert_file, monkeypatch
):
    data = expert_file(seed=5)
    sha256 = hashlib.sha256(data).hexdigest()
    key = storage.content_key(sha256)
    storage.put(key, io.BytesIO(data))  # left by a version deleted a moment ago
    holding, go = threading.Event(), threading.Event()
    put = storage.put

    def slow_put(*args, **kwargs):  # the publish has the bytes but no row yet
        created = put(*args, **kwargs)
        holding.set()
        go.wait(10)
        return created

    monkeypatch.setattr(storage, "put", slow_put)
    expert = make_expert()

    def publish():
        try:
            ExpertVersion.publish(expert, io.BytesIO(data), sha256=sha256, size=len(data))
        finally:
            connection.close()

    def delete():
        try:
            outcome.append(references.discard_unused(key))
        finally:
            connection.close()

    outcome = []
    publisher = threading.Thread(target=publish)
    publisher.start()
    assert holding.wait(10)
    deleter = threading.Thread(target=delete)
    deleter.start()
    deleter.join(1)
    assert deleter.is_alive()  # it waits for the publish to commit
    go.set()
    publisher.join(30)
    deleter.join(30)
    assert outcome == [False]  # it found the new row
    assert ExpertVersion.objects.get().artifact_key == key and key in stored_keys()
