"""Starting jobs: one way in for the API, the admin and the management commands."""

from django.db import transaction

from .models import EvaluationJob, TrainingJob
from .tasks import enqueue


def start_training(user, expert, datasets, params):
    """Queue a training job that publishes ``expert``'s next version. ``params`` are checked
    hyper-parameters (serializers.TrainingParamsSerializer)."""
    with transaction.atomic():
        job = TrainingJob.objects.create(
            created_by=user, expert=expert, base_model=expert.base_model, params=params
        )
        job.datasets.set(datasets)
        enqueue(job)
    return job


def start_evaluation(user, version, datasets, params):
    with transaction.atomic():
        job = EvaluationJob.objects.create(created_by=user, version=version, params=params)
        job.datasets.set(datasets)
        enqueue(job)
    return job


def evaluation_params(version):
    """Measure a version as it was trained: its window and ahead tokens, on held-out text."""
    training = version.config.get("training", {}) if isinstance(version.config, dict) else {}
    return {
        "window": int(training.get("window", 256)),
        "ahead": int(training.get("ahead_tokens", 16)),
        "max_windows": 32,
        "split": "heldout",
    }


def retry(job):
    """Queue a failed or cancelled job again; False if it is neither. Training continues from
    a kept checkpoint (a storage outage keeps it); cancelled and failed runs start over."""
    with transaction.atomic():
        if not job.requeue():
            return False
        enqueue(job)
    return True
