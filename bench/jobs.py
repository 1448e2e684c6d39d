"""Job queue overhead and cancel latency with real Celery workers.

What it measures:

1. Overhead: ``--jobs`` small training jobs on a tiny model are queued at once for ``--workers``
   worker processes (already started and idle). Each training job queues its evaluation when it
   ends; the run ends when every job has ended. Per worker, its span is the time from queueing
   to the end of its last job; the overhead is the part of all spans not spent inside a job
   (pick-up latency, gaps between jobs, waiting at the end), over the sum of the jobs' own run
   times (started_at to finished_at on each job row). Time a worker spends waiting for a job
   that does not exist yet (an evaluation is queued only when its training ends) is not the
   queue's: each job's pick-up gap runs from when it was both queued and its worker free to
   when it started:
   ``overhead_pct = sum of pick-up gaps / sum of run times * 100``.
2. Cancel latency: a long job is started; once it runs, a cancel is requested (as the API does)
   and the time until its row says ``cancelled`` is measured, ``--cancels`` times (median).

It uses its own SQLite database, broker folder and artifact folder under a temporary
directory (or the broker in CELERY_BROKER_URL, e.g. Redis), never the developer's var/.

    .venv/bin/python bench/jobs.py [--jobs 5] [--workers 2] [--steps 300] [--cancels 3]

Ends with ``RESULT queue_overhead_pct=<x> cancel_latency_s=<x>``.
Targets: overhead under 10%, cancel under 5 s.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SCRATCH = Path(tempfile.mkdtemp(prefix="latentry-bench-jobs-"))
os.environ["LATENTRY_VAR_DIR"] = str(SCRATCH)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DEBUG", "true")  # an in-process development setup
os.environ.pop("DATABASE_URL", None)  # the scratch SQLite file
os.environ["LATENTRY_MAX_ACTIVE_JOBS"] = "0"  # one user queues them all: the queue, not the cap

import django  # noqa: E402

django.setup()

from common import add_smoke_argument, parse  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402

from coprocessor.base_models import convert, describe  # noqa: E402
from registry.models import Domain, Expert  # noqa: E402
from tests.factories import (  # noqa: E402
    SMALL_JOB,
    Worker,
    frozen,
    make_dataset,
    new_queue,
    register_tiny_llama,
    tiny_llama,
    wait_for,
    word_tokenizer,
    worker_env,
)
from training.models import EvaluationJob, Job, TrainingJob  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300, help="training steps per job")
    p.add_argument("--cancels", type=int, default=3)
    add_smoke_argument(p)
    args = parse(p, smoke=dict(jobs=1, workers=1, steps=5, cancels=1))
    if args.smoke:  # a cancel is seen at the next heartbeat: sooner, so the run is short
        settings.LATENTRY_PROGRESS_SECONDS = 0.25

    call_command("migrate", verbosity=0)
    user, base, domain = setup_registry()
    dataset = make_dataset(user, base_model=base)
    queue = new_queue()
    settings.LATENTRY_JOB_QUEUE = queue
    env = worker_env(queue, settings.ARTIFACTS_DIR, DATABASE_URL=f"sqlite:///{database()}")
    env["LATENTRY_PROGRESS_SECONDS"] = str(settings.LATENTRY_PROGRESS_SECONDS)
    workers = [
        Worker(queue, env, name=f"bench{i}", log_path=SCRATCH / f"worker{i}.log")
        for i in range(args.workers)
    ]
    try:
        for worker in workers:
            wait_for(lambda w=worker: "ready." in w.output(), timeout=120, what="worker start")
        overhead = measure_overhead(args, user, base, domain, dataset)
        latency = measure_cancel(args, user, base, domain, dataset)
    finally:
        for worker in workers:
            worker.stop()
    print(f"RESULT queue_overhead_pct={overhead:.2f} cancel_latency_s={latency:.2f}")


def setup_registry():
    user = get_user_model().objects.create_user("bench")
    folder = SCRATCH / "tiny-llama"
    model = frozen(tiny_llama)
    convert(model, word_tokenizer(), folder)
    base = register_tiny_llama(describe(model), folder)
    return user, base, Domain.objects.create(slug="bench", name="Bench")


def database():
    return settings.DATABASES["default"]["NAME"]


def new_expert(user, base, domain, name):
    return Expert.objects.create(owner=user, name=name, domain=domain, base_model=base)


def measure_overhead(args, user, base, domain, dataset):
    queued_at = time.time()
    trainings = [
        TrainingJob.start(
            user,
            new_expert(user, base, domain, f"expert-{i}"),
            [dataset],
            {**SMALL_JOB, "steps": args.steps, "checkpoint_every": 100},
        )
        for i in range(args.jobs)
    ]
    ids = [job.pk for job in trainings]

    def all_done():
        if TrainingJob.objects.filter(pk__in=ids).exclude(status__in=Job.FINISHED).exists():
            return False
        evaluations = EvaluationJob.objects.filter(version__training_job__in=ids)
        return evaluations.count() == len(ids) and all(e.finished for e in evaluations)

    wait_for(all_done, timeout=3600, interval=0.2, what="all jobs")
    jobs = list(TrainingJob.objects.filter(pk__in=ids)) + list(
        EvaluationJob.objects.filter(version__training_job__in=ids)
    )
    failed = [job for job in jobs if job.status != Job.SUCCEEDED]
    if failed:
        raise SystemExit(f"{len(failed)} jobs did not succeed: {[j.error for j in failed]}")
    runs = [(j.finished_at - j.started_at).total_seconds() for j in jobs]
    spans, gaps, free_at = {}, [], {}
    for job in sorted(jobs, key=lambda j: j.started_at):
        available = max(job.created_at.timestamp(), free_at.get(job.worker, queued_at))
        gaps.append(job.started_at.timestamp() - available)
        free_at[job.worker] = job.finished_at.timestamp()
        spans[job.worker] = free_at[job.worker] - queued_at
    wall = max(spans.values())
    overhead = sum(gaps) / sum(runs) * 100
    print(f"{len(trainings)} training + {len(jobs) - len(trainings)} evaluation jobs")
    print(f"workers used: {len(spans)}; wall {wall:.2f} s; sum of run times {sum(runs):.2f} s")
    print(f"training run times: {[round(r, 2) for r in runs[: len(trainings)]]}")
    print(f"worker spans: { {w: round(s, 2) for w, s in spans.items()} }")
    print(f"pick-up gaps (s): {[round(g, 3) for g in gaps]}")
    print("timeline (s after queueing): worker, job, picked up, started, finished")
    for job in sorted(jobs, key=lambda j: (j.worker, j.started_at)):
        start, end = (t.timestamp() - queued_at for t in (job.started_at, job.finished_at))
        print(f"  {job.worker:24} {str(job):40.40} {start:7.2f} {end:7.2f}")
    print(f"queue overhead {overhead:.2f}%")
    return overhead


def measure_cancel(args, user, base, domain, dataset):
    latencies = []
    for i in range(args.cancels):
        job = TrainingJob.start(
            user,
            new_expert(user, base, domain, f"cancelled-{i}"),
            [dataset],
            {**SMALL_JOB, "steps": 1_000_000, "checkpoint_every": 50},
        )
        wait_for(lambda j=job: refreshed(j).step > 0, timeout=120, what="the job to run")
        asked = time.monotonic()
        job.request_cancel()
        wait_for(lambda j=job: refreshed(j).finished, timeout=120, interval=0.01, what="cancel")
        latencies.append(time.monotonic() - asked)
        assert job.status == Job.CANCELLED, job.status
    print(f"cancel latencies (s): {[round(x, 2) for x in latencies]}")
    return statistics.median(latencies)


def refreshed(job):
    job.refresh_from_db()
    return job


if __name__ == "__main__":
    main()
