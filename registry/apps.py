from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Registry"

    def ready(self):
        from . import schema  # noqa: F401 - registers the API key scheme with drf-spectacular
