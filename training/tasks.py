"""Celery tasks: claim the job row, run it, map the outcome to the job's status.

Tasks carry only the job id. ``acks_late`` + ``reject_on_worker_lost`` (settings) mean a
message is acknowledged after the job ends, so a killed worker's job is delivered again; the
claim in ``Job.claim`` makes every extra delivery harmless. Storage outages are retried with
a delay; anything else ends the job ``failed`` with a readable error.
"""

import logging
import threading
import time
from datetime import timedelta

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_ready
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import Q
from django.utils import timezone

from coprocessor.artifact import ArtifactError
from coprocessor.train import Cancelled
from registry.models import Expert, ExpertVersion
from registry.quotas import QuotaExceeded
from registry.storage import StorageUnavailable

from . import datasets, runner, runtime
from .datasets import DatasetError
from .models import (
    Benchmark,
    Dataset,
    EvaluationJob,
    Job,
    JobHeld,
    JobLost,
    TrainingJob,
    another_users_turn,
    refresh_figures,
)

logger = logging.getLogger(__name__)

YIELD_DELAY_S = 2  # a job that gave up its turn is back in the queue after this

USER_ERRORS = (runtime.JobError, DatasetError, ArtifactError, QuotaExceeded, ValueError)

task_options = dict(
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    time_limit=settings.LATENTRY_JOB_TIME_LIMIT,
    soft_time_limit=max(60, settings.LATENTRY_JOB_TIME_LIMIT - 60),
)


@shared_task(name="training.train_expert", **task_options)
def train_expert(self, job_id, waiting_since=None):
    _run(self, TrainingJob, job_id, runner.run_training, waiting_since)


@shared_task(name="training.evaluate_version", **task_options)
def evaluate_version(self, job_id, waiting_since=None):
    _run(self, EvaluationJob, job_id, runner.run_evaluation, waiting_since)


def _run(task, model, job_id, work, waiting_since=None):
    if _yield_turn(task, model, job_id, waiting_since):
        return
    device = runtime.device()
    try:
        job = model.claim(job_id, task.request.hostname or "local", device)
    except JobHeld as exc:
        # Someone is on it. If they die, this delivery comes back after a lease and takes over.
        logger.info("%s; checking again in %ss", exc, settings.LATENTRY_JOB_LEASE_SECONDS)
        task.apply_async(
            (job_id,),
            queue=settings.LATENTRY_JOB_QUEUE,
            countdown=settings.LATENTRY_JOB_LEASE_SECONDS,
        )
        return
    if job is None:
        return
    try:
        with Heartbeat(job):
            work(job, device)
    except JobLost as exc:
        logger.warning("%s; leaving it to the worker that has it now", exc)
    except Cancelled:
        job.finish(Job.CANCELLED, error="cancelled by request")
    except StorageUnavailable as exc:
        if task.request.retries < settings.LATENTRY_JOB_STORAGE_RETRIES:
            job.release(f"storage unavailable, retry {task.request.retries + 1}: {exc}")
            raise task.retry(exc=exc, countdown=settings.LATENTRY_JOB_RETRY_DELAY) from exc
        job.finish(Job.FAILED, error=f"storage unavailable after retries: {exc}")
    except SoftTimeLimitExceeded:
        job.finish(Job.FAILED, error="stopped at the job time limit")
    except USER_ERRORS as exc:
        job.finish(Job.FAILED, error=str(exc))
    except DatabaseError:
        # Its text may quote SQL and values: for the log, never for the job's owner.
        logger.exception("%s failed", job)
        job.finish(Job.FAILED, error="internal error: the database refused a write (logged)")
    except Exception as exc:
        logger.exception("%s failed", job)
        job.finish(Job.FAILED, error=f"internal error: {type(exc).__name__}: {exc}")


def _yield_turn(task, model, job_id, waiting_since):
    """Send a job back to the queue, a few seconds later, when another user's queued job has
    the turn (``models.fair_order``): the broker is first-in first-out, so the other job's
    message is taken meanwhile. For at most LATENTRY_JOB_MAX_YIELD_S in all (in case the other
    job's message was lost); never a job that already started (a retry keeps its count)."""
    job = model.objects.filter(pk=job_id, status=Job.QUEUED, attempts=0).first()
    now = time.time()
    waiting_since = waiting_since or now
    if (
        job is None
        or now - waiting_since >= settings.LATENTRY_JOB_MAX_YIELD_S
        or not another_users_turn(job)
    ):
        return False
    logger.info("%s waits: another user's job has the turn", job)
    task.apply_async(
        (job_id,),
        {"waiting_since": waiting_since},
        queue=settings.LATENTRY_JOB_QUEUE,
        countdown=YIELD_DELAY_S,
    )
    return True


@shared_task(name="training.count_dataset_tokens", ignore_result=True)
def count_dataset_tokens(dataset_id):
    """Count a large dataset's tokens under its base model's tokenizer, off the web request."""
    dataset = Dataset.objects.select_related("base_model").filter(pk=dataset_id).first()
    if dataset is None or dataset.base_model is None:
        return
    count = datasets.count_tokens(dataset.base_model, datasets.read_texts(dataset))
    Dataset.objects.filter(pk=dataset_id).update(token_count=count)


@shared_task(name="training.measure_on_benchmark", ignore_result=True)
def measure_on_benchmark(benchmark_id):
    """Queue the measurement of each expert's newest ready version on a new benchmark."""
    benchmark = Benchmark.objects.filter(pk=benchmark_id).first()
    if benchmark is None:
        return
    versions = (
        ExpertVersion.objects.newest_ready()
        .light()
        .exclude(benchmark_results__benchmark=benchmark)
        .select_related("expert__owner")
    )
    for version in versions.iterator():
        EvaluationJob.start_on_benchmarks(version, [benchmark])
    # The domain's owner-data figures give way to the benchmark's, not measured until it is.
    refresh_figures(domain=benchmark.domain_id, gain_source=Expert.OWNER_DATA)


class Heartbeat:
    """Keeps the job's lease alive from a thread while the work runs, through phases that
    report no progress (loading models, reading datasets, evaluating)."""

    def __init__(self, job):
        self.job = job
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{job.pk}", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stopped.set()
        self.thread.join()

    def _beat(self):
        try:
            while not self.stopped.wait(settings.LATENTRY_PROGRESS_SECONDS):
                if not self.job._held().update(heartbeat_at=timezone.now()):
                    return  # taken over: the work finds out at its next report
        finally:
            connection.close()  # this thread's own database connection


def recover_orphans(hostname=None, include_queued=True):
    """Send again the jobs whose worker died, and (``include_queued``) queued jobs whose
    message may have died with one. Run when a worker starts: its own running jobs are orphans
    by definition (it runs nothing yet), others' once their heartbeat lapsed. Extra deliveries
    are harmless."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.LATENTRY_JOB_LEASE_SECONDS)
    recovered = []
    for model in (TrainingJob, EvaluationJob):
        if hostname:
            model.objects.filter(status=Job.RUNNING, worker=hostname).update(
                status=Job.QUEUED, worker="", heartbeat_at=None
            )
        lost = Q(status=Job.RUNNING, heartbeat_at__lt=stale)
        if include_queued:
            lost |= Q(status=Job.QUEUED, created_at__lt=stale) | Q(
                status=Job.QUEUED, worker="", attempts__gt=0
            )
        for job in model.objects.filter(lost):
            if job.status == Job.RUNNING and not _take_back(model, job, stale):
                continue
            job.enqueue()
            recovered.append(job)
    if recovered:
        logger.warning("re-sent %d jobs whose worker or message was lost", len(recovered))
    return recovered


def _take_back(model, job, stale):
    """Queue a lapsed job again, once: a later recovery then finds it queued, not lapsed, and
    sends no duplicate; its worker, if it was only slow, finds the job gone (JobLost)."""
    return model.objects.filter(pk=job.pk, status=Job.RUNNING, heartbeat_at__lt=stale).update(
        status=Job.QUEUED, worker="", heartbeat_at=None
    )


@shared_task(name="training.recover_lapsed_jobs", ignore_result=True)
def recover_lapsed_jobs():
    """Every lease period (celery beat): re-send running jobs whose worker stopped beating, so
    a worker that dies for good does not strand its job until some worker starts. Queued jobs
    are left alone here: they may only be waiting their turn behind long ones."""
    return len(recover_orphans(include_queued=False))


@worker_ready.connect
def _recover_on_start(sender, **kwargs):
    recover_orphans(getattr(sender, "hostname", None))
