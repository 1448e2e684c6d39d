"""Answers for input and outages the database refuses: 400 for values it cannot store, 503
while it is unreachable, each with a reason instead of a 500 page."""

import logging

from django.db import DataError, InterfaceError, OperationalError
from django.http import JsonResponse
from django.template.response import SimpleTemplateResponse

from .api import UNSTORABLE

logger = logging.getLogger(__name__)


class DatabaseUnavailableMiddleware:
    """A lost database connection fails the request it happened in with 503 (JSON for API
    clients, a page for people); Django's connection health checks reconnect the next one."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

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


class RejectNulMiddleware:
    """400 for a NUL byte in the path or the query string: no page or lookup can want one, and
    PostgreSQL refuses it in any query (a 500 if it got that far)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        query = request.GET.lists()
        if "\x00" in request.path or any("\x00" in k + "".join(v) for k, v in query):
            return JsonResponse({"detail": "the address holds a NUL character"}, status=400)
        return self.get_response(request)
