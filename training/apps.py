from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"

    def ready(self):
        # Register the Celery tasks in every process (Job.enqueue finds them by name), and
        # connect the receivers of registry and training saves (importing them connects them).
        from . import listeners, tasks  # noqa: F401
