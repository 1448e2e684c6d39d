"""gunicorn settings, read from the project root. With LATENTRY_WARMUP on, each worker loads
the base models before it takes requests: the router's first answer is as fast as the rest."""

import os

bind = os.environ.get("GUNICORN_BIND", f"0.0.0.0:{os.environ.get('PORT', '8000')}")
worker_class = "gthread"
workers = int(os.environ.get("WEB_WORKERS", "2"))
threads = int(os.environ.get("WEB_THREADS", "8"))
timeout = int(os.environ.get("WEB_TIMEOUT", "120"))  # long generations, streamed answers


def post_worker_init(worker):
    from django.conf import settings

    if settings.LATENTRY_WARMUP:
        from inference.pool import warm_up

        warm_up()
