from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"

    def ready(self):
        # Register the Celery tasks in every process: Job.enqueue finds them by name.
        from . import tasks  # noqa: F401
