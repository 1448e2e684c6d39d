"""Answers for when the database is unreachable: 503 with a reason, not a 500 page."""

import logging

from django.db import InterfaceError, OperationalError
from django.http import JsonResponse
from django.template.response import SimpleTemplateResponse

logger = logging.getLogger(__name__)


class DatabaseUnavailableMiddleware:
    """A lost database connection fails the request it happened in with 503 (JSON for API
    clients, a page for people); Django's connection health checks reconnect the next one."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
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
