"""Answers for input and outages the database refuses: 400 for values it cannot store, 503
while it is unreachable, each with a reason instead of a 500 page; static files.

Every middleware here runs in both modes. One that runs only synchronously makes Django's
ASGI handler run the whole chain in a thread and wait there for the async view, holding that
thread for the length of the request (a generation included): the serving process's few
shared threads (``inference.asgi.SharedSyncThreads``) would then queue one request behind
another's whole answer instead of behind its database work only.
"""

import logging

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.db import DataError, InterfaceError, OperationalError
from django.http import JsonResponse
from django.template.response import SimpleTemplateResponse
from django.utils.deprecation import MiddlewareMixin
from whitenoise.middleware import WhiteNoiseMiddleware

from .api import UNSTORABLE

logger = logging.getLogger(__name__)


class DatabaseUnavailableMiddleware(MiddlewareMixin):
    """A lost database connection fails the request it happened in with 503 (JSON for API
    clients, a page for people); Django's connection health checks reconnect the next one."""

    def process_exception(self, request, exception):
        if isinstance(exception, DataError):  # input the database refuses (a NUL byte): 400
            return JsonResponse({"detail": UNSTORABLE}, status=400)
        if not isinstance(exception, (OperationalError, InterfaceError)):
            return None
        logger.error("database unavailable: %s", exception)
        message = "the database is unavailable; nothing was changed, try again shortly"
        if request.path.startswith(("/api/", "/v1/")):
            response = JsonResponse({"detail": message}, status=503)
        else:
            response = SimpleTemplateResponse("503.html", {"message": message}, status=503)
        response["Retry-After"] = "5"
        return response


class RejectNulMiddleware(MiddlewareMixin):
    """400 for a NUL byte in the path or the query string: no page or lookup can want one, and
    PostgreSQL refuses it in any query (a 500 if it got that far)."""

    def process_request(self, request):
        query = request.GET.lists()
        if "\x00" in request.path or any("\x00" in k + "".join(v) for k, v in query):
            return JsonResponse({"detail": "the address holds a NUL character"}, status=400)
        return None


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise, which runs only synchronously, in both modes: a static file is found (a
    lookup in memory; in development, a few checks on disk) and answered as WhiteNoise does,
    anything else goes on without leaving the event loop."""

    sync_capable = async_capable = True

    def __init__(self, get_response):
        super().__init__(get_response)
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return super().__call__(request)

    async def __acall__(self, request):
        path = request.path_info
        static_file = self.find_file(path) if self.autorefresh else self.files.get(path)
        if static_file is not None:
            return self.serve(static_file, request)
        return await self.get_response(request)
