"""The ASGI application: what a serving process (and ``make run``) runs under uvicorn."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_asgi_application()


def _application():
    from django.conf import settings

    from inference.asgi import BoundedBody, SharedSyncThreads

    app = SharedSyncThreads(django_application, settings.LATENTRY_ROUTER_SYNC_THREADS)
    return BoundedBody(app, settings.LATENTRY_ROUTER_MAX_BODY_BYTES)


application = _application()


def _warm_up():
    from django.conf import settings

    if settings.LATENTRY_WARMUP:  # base models loaded before the first request
        from inference.pool import warm_up

        warm_up()


_warm_up()
