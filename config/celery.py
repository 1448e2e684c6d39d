"""The Celery app. Broker and queues come from Django settings (CELERY_* names)."""

import os

from celery import Celery
from celery.signals import worker_process_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("latentry")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def yield_to_serving(**kwargs):
    """Job workers run at a lower CPU priority: on a machine that also serves (``make run``,
    a small deployment), a request is answered at nearly full speed while a job trains."""
    from django.conf import settings

    if settings.LATENTRY_WORKER_NICE:
        os.nice(settings.LATENTRY_WORKER_NICE)
