"""Open router requests share a few threads for their synchronous work.

Django's ASGI handler gives each request a thread of its own for the synchronous parts it
runs (middleware, the database through ``sync_to_async``), held, idle, until the response
ends, and with it that thread's database connection: a few hundred open streams would hold a
few hundred threads and more connections than PostgreSQL allows (100 by default). For the
router paths, whose synchronous work is short (authentication, a lookup, a usage row),
``SharedSyncThreads`` hands that work to one of a few shared threads instead (asgiref's
``ThreadSensitiveContext`` with an executor), so threads and connections stay bounded by
``threads`` however many streams are open.
"""

import itertools
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext

ROUTER_PATHS = ("/v1/", "/api/v1/generate", "/api/v1/attach")


class SharedSyncThreads:
    """ASGI middleware: a router request's thread-sensitive work runs on one of ``threads``
    shared single-thread executors (asgiref requires one call at a time per executor); each
    request keeps one executor, chosen in turn, for its whole length."""

    def __init__(self, app, threads, paths=ROUTER_PATHS):
        self.app, self.paths = app, paths
        self.executors = itertools.cycle(
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"router-sync-{i}")
            for i in range(threads)
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.paths):
            return await self.app(scope, receive, send)
        async with ThreadSensitiveContext(executor=next(self.executors)):
            return await self.app(scope, receive, send)
