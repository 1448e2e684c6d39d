"""How the API reads request bodies: JSON within bounds (the REST_FRAMEWORK setting's default
parser, used by every view and the router's async views), and the 413 a body too large gets.

Kept apart from api.py: DRF imports its default parsers while defining APIView, so this
module must not import rest_framework.views."""

from django.conf import settings
from rest_framework import exceptions, status
from rest_framework.parsers import JSONParser, get_encoding
from rest_framework.utils.json import strict_constant

from coprocessor import bounded_json


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "upload is too large"
    default_code = "too_large"


def parse_json(text):
    """JSON a user sent (a body, a form field), within LATENTRY_JSON_MAX_BYTES and
    LATENTRY_JSON_MAX_DEPTH: ``bounded_json.TooLarge``, ``TooDeep`` or another ValueError
    (not JSON) say why not."""
    return bounded_json.loads(
        text,
        max_bytes=settings.LATENTRY_JSON_MAX_BYTES,
        max_depth=settings.LATENTRY_JSON_MAX_DEPTH,
        parse_constant=strict_constant,  # NaN and Infinity are not JSON
    )


class BoundedJSONParser(JSONParser):
    """Every JSON body of the API and the router: 413 past LATENTRY_JSON_MAX_BYTES (read no
    further), 400 past LATENTRY_JSON_MAX_DEPTH, each saying so."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.LATENTRY_JSON_MAX_BYTES
        raw = stream.read(limit + 1)
        if len(raw) > limit:
            raise PayloadTooLarge(f"JSON body is over the limit of {limit} bytes")
        try:
            return parse_json(raw.decode(get_encoding(parser_context or {})))
        except bounded_json.Refused as exc:
            raise exceptions.ParseError(f"JSON body {exc}") from None
        except ValueError as exc:  # not JSON, or not in its encoding
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
