from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    name = "webhooks"

    def ready(self):
        # Listen to registry.events in every process, and register the delivery task (workers
        # find it by name).
        from . import receivers, tasks  # noqa: F401
