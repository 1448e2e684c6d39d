"""The ASGI application: what a serving process (and ``make run``) runs under uvicorn."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_asgi_application()


def _warm_up():
    from django.conf import settings

    if settings.LATENTRY_WARMUP:  # base models loaded before the first request
        from inference.pool import warm_up

        warm_up()


_warm_up()
