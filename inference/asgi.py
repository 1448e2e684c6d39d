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

import json
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext

ROUTER_PATHS = ("/v1/", "/api/v1/generate", "/api/v1/attach")


class SharedSyncThreads:
    """ASGI middleware: a router request's thread-sensitive work runs on one of ``threads``
    shared single-thread executors (asgiref requires one call at a time per executor); each
    request keeps one executor for its whole length, the one fewest open requests share, so
    that a burst of one caller's requests spreads out instead of stacking on some threads."""

    def __init__(self, app, threads, paths=ROUTER_PATHS):
        self.app, self.paths = app, paths
        self.executors = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"router-sync-{i}")
            for i in range(threads)
        ]
        self.sharing = [0] * threads  # open requests per executor (the event loop's alone)

    def close_connections(self):
        """Close the database connections the shared threads hold (a test database cannot be
        dropped while they are open)."""
        from django.db import connections

        for executor in self.executors:
            executor.submit(connections.close_all).result()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.paths):
            return await self.app(scope, receive, send)
        index = self.sharing.index(min(self.sharing))
        self.sharing[index] += 1
        try:
            async with ThreadSensitiveContext(executor=self.executors[index]):
                return await self.app(scope, receive, send)
        finally:
            self.sharing[index] -= 1


class BoundedBody:
    """ASGI middleware: a router request's body may hold at most ``max_bytes``; a larger one is
    answered 413 before the application reads it (a declared Content-Length) or as soon as it
    passes the bound (a chunked one). Django's handler would otherwise take any body whole,
    spooled to disk, before a view could refuse it."""

    def __init__(self, app, max_bytes, paths=ROUTER_PATHS):
        self.app, self.max_bytes, self.paths = app, max_bytes, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.paths):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._refuse(scope, send)
        received, started = 0, False

        async def bounded_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return {"type": "http.disconnect"}  # Django stops reading: RequestAborted
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, bounded_receive, watched_send)
        if received > self.max_bytes and not started:
            await self._refuse(scope, send)

    async def _refuse(self, scope, send):
        message = f"the request body is over the limit of {self.max_bytes} bytes"
        if scope["path"].startswith("/v1/"):  # OpenAI's shape
            error = {"message": message, "type": "invalid_request_error", "code": 413}
            body = {"error": {**error, "param": None}}
        else:
            body = {"detail": message}
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
