"""Jobs on real worker processes: SIGKILL and resume, cancel, storage outages.

Runs against the environment's broker (Redis in CI, the filesystem broker here) and database.
"""

import pytest

from registry.models import ExpertVersion
from tests.factories import Worker, make_dataset, new_queue, stored_keys, wait_for, worker_env
from training.models import Job, TrainingJob

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

LONG = dict(window=64, ahead_tokens=4, positions_per_window=4, n_latents=2, lora_rank=2)


@pytest.fixture
def queue(settings):
    settings.LATENTRY_JOB_QUEUE = new_queue()
    return settings.LATENTRY_JOB_QUEUE


@pytest.fixture
def start_worker(queue, tmp_path):
    started = []

    def start(name="w1", **env):
        worker = Worker(
            queue,
            worker_env(queue, tmp_path / "artifacts", **env),
            name=name,
            log_path=tmp_path / f"{name}.log",
        )
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def job_state(job):
    job.refresh_from_db()
    return job


def test_a_killed_worker_s_job_resumes_from_its_checkpoint_and_publishes_once(
    alice, base_model, make_expert, start_worker
):
    words = make_dataset(alice)
    job = TrainingJob.start(
        alice, make_expert("resumed"), [words], {**LONG, "steps": 400, "checkpoint_every": 25}
    )
    first = start_worker()
    wait_for(lambda: job_state(job).checkpoint_step >= 50, what="two checkpoints")
    first.kill()
    checkpointed = job_state(job).checkpoint_step
    assert job.status == Job.RUNNING and checkpointed < 400
    second = start_worker()  # the same node, back after a crash
    wait_for(lambda: job_state(job).finished, timeout=120, what="the job to end")
    assert job.status == Job.SUCCEEDED, job.error + second.output()[-3000:]
    assert job.attempts == 2
    assert job.resumed_from_step == checkpointed
    assert ExpertVersion.objects.filter(training_job=job).count() == 1
    assert ExpertVersion.objects.filter(expert=job.expert).count() == 1
    assert not [k for k in stored_keys() if k.startswith("checkpoints/")]


def test_cancelling_a_running_job_stops_it_with_no_version(
    alice, base_model, make_expert, start_worker
):
    words = make_dataset(alice)
    job = TrainingJob.start(alice, make_expert("cancelled"), [words], {**LONG, "steps": 100_000})
    start_worker()
    wait_for(lambda: job_state(job).step >= 20, what="the job to run")
    job.request_cancel()
    wait_for(lambda: job_state(job).finished, timeout=30, what="the job to stop")
    assert job.status == Job.CANCELLED
    assert job.step < 100_000
    assert not ExpertVersion.objects.exists()
    assert not [k for k in stored_keys() if k.startswith("checkpoints/")]


def test_a_storage_outage_is_retried_and_the_job_finishes_when_it_is_back(
    alice, base_model, make_expert, start_worker, flaky_s3
):
    words = make_dataset(alice)
    flaky_s3.cut()
    job = TrainingJob.start(alice, make_expert("flaky"), [words], {**LONG, "steps": 40})
    start_worker(**flaky_s3.env)
    wait_for(
        lambda: "storage unavailable, retry" in job_state(job).error,
        timeout=60,
        what="a retried storage error",
    )
    flaky_s3.restore()
    wait_for(lambda: job_state(job).finished, timeout=90, what="the job to end")
    assert job.status == Job.SUCCEEDED, job.error
    assert job.attempts >= 2
    assert ExpertVersion.objects.filter(training_job=job).count() == 1


def test_a_lasting_storage_outage_fails_the_job_cleanly(
    alice, base_model, make_expert, start_worker, flaky_s3
):
    words = make_dataset(alice)
    flaky_s3.cut()
    job = TrainingJob.start(alice, make_expert("down"), [words], {**LONG, "steps": 40})
    start_worker(LATENTRY_JOB_STORAGE_RETRIES=1, **flaky_s3.env)
    wait_for(lambda: job_state(job).finished, timeout=120, what="the job to fail")
    assert job.status == Job.FAILED
    assert "storage unavailable after retries" in job.error
    assert not ExpertVersion.objects.exists()
    assert TrainingJob.objects.get(pk=job.pk).attempts == 2


def test_the_periodic_recovery_resends_a_dead_worker_s_job_to_a_live_one(
    alice, base_model, make_expert, start_worker, queue, settings
):
    from datetime import timedelta

    from django.utils import timezone

    from training.tasks import recover_lapsed_jobs

    start_worker().wait_ready()  # up before the jobs exist: its start-up recovery saw nothing
    settings.LATENTRY_JOB_QUEUE = "nobody-reads-this"  # the jobs' own messages get lost
    words = make_dataset(alice)
    job = TrainingJob.start(alice, make_expert("stranded"), [words], {**LONG, "steps": 20})
    # ... and a worker that has since died holds the job.
    TrainingJob.objects.filter(pk=job.pk).update(
        status=Job.RUNNING, worker="dead@host", heartbeat_at=timezone.now() - timedelta(hours=1)
    )
    waiting = TrainingJob.start(alice, make_expert("waiting"), [words], {**LONG, "steps": 20})
    TrainingJob.objects.filter(pk=waiting.pk).update(created_at=timezone.now() - timedelta(hours=1))
    recover_lapsed_jobs.apply_async(queue=queue)  # what beat sends every lease period
    wait_for(lambda: job_state(job).finished, timeout=120, what="the stranded job to end")
    assert job.status == Job.SUCCEEDED and job.attempts == 1 and job.worker != "dead@host"
    assert job_state(waiting).status == Job.QUEUED  # queued ones may be waiting: not re-sent
