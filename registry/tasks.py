"""Celery tasks of the registry: the periodic storage sweep (celery beat)."""

from celery import shared_task

from . import references


@shared_task(name="registry.sweep_storage", ignore_result=True)
def sweep_storage():
    """Remove stored objects that no row names (``references.sweep``)."""
    return len(references.sweep())
