"""What the whole API version shares: the viewsets' base, pagination, rate limits, errors,
strict serializers, ordering. (What the HTML pages share is in ``page_tools.py``.)"""

from django.conf import settings
from django.core.exceptions import FieldDoesNotExist, RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError
from django.db.models import F
from rest_framework import exceptions, filters, pagination, permissions, serializers, status
from rest_framework.throttling import SimpleRateThrottle
from rest_framework.views import exception_handler as drf_exception_handler

from coprocessor.artifact import ArtifactError

from . import search
from .models import NameTaken, VersionConflict
from .parsers import PayloadTooLarge
from .permissions import ApiKeyScope
from .storage import StorageUnavailable


class ApiDefaults:
    """The base of every viewset of the API (settings.REST_FRAMEWORK gives the rest: keys and
    sessions, pagination, no filters unless a view names them).

    Whatever permissions a view lists, a read-only API key never writes: the key's scope is
    checked first, so such a request is refused before anything is looked up."""

    def get_permissions(self):
        listed = [p for p in super().get_permissions() if not isinstance(p, ApiKeyScope)]
        return [ApiKeyScope(), *listed]  # once, even where the settings' default lists it


class Pagination(pagination.PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = 100


class RateThrottle(SimpleRateThrottle):
    """A limit per user, or per client address when signed out, at the rate that
    settings.LATENTRY_THROTTLE_RATES gives its scope (read per request; None: no limit).

    Counted in fixed windows of the rate's period with the cache's atomic ``incr``: DRF's
    history (read the list, append, write it back) lets a burst of concurrent requests each
    read the same history and all pass, as eight generations at once did. A window allows
    up to twice the rate across its boundary, never more."""

    def get_rate(self):
        return settings.LATENTRY_THROTTLE_RATES.get(self.scope)

    def allow_request(self, request, view):
        if self.rate is None or (key := self.get_cache_key(request, view)) is None:
            return True
        self.now = self.timer()
        window = int(self.now // self.duration)
        self.window_ends = (window + 1) * self.duration
        counter = f"{key}:{window}"
        self.cache.add(counter, 0, timeout=self.duration + 1)
        try:
            count = self.cache.incr(counter)
        except ValueError:  # expired between add and incr: this request opens it again
            self.cache.add(counter, 1, timeout=self.duration + 1)
            count = 1
        return count <= self.num_requests

    def wait(self):
        return max(0.0, self.window_ends - self.now)

    def get_cache_key(self, request, view):
        user = request.user
        ident = f"user-{user.pk}" if user and user.is_authenticated else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}


class GenerateThrottle(RateThrottle):
    """Generation: signed-out callers (where they may generate) count at their own rate."""

    scope = "generate"

    def allow_request(self, request, view):
        if not request.user.is_authenticated:
            self.scope = "generate_anonymous"
            self.rate = self.get_rate()
            if self.rate is not None:
                self.num_requests, self.duration = self.parse_rate(self.rate)
        return super().allow_request(request, view)


class AnnounceThrottle(RateThrottle):
    """Writes that webhooks hear of (alias moves, test pings): each one fans out to up to
    LATENTRY_MAX_WEBHOOKS deliveries, so a loop of them is bounded here."""

    scope = "announce"

    def allow_request(self, request, view):
        if request.method in permissions.SAFE_METHODS:
            return True
        return super().allow_request(request, view)


class UploadThrottle(RateThrottle):
    """Uploads only: reading versions and datasets is not limited."""

    scope = "upload"

    def allow_request(self, request, view):
        if request.method in permissions.SAFE_METHODS:
            return True
        return super().allow_request(request, view)


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "conflicts with the current state"
    default_code = "conflict"


class ServiceUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "a backing service is unavailable; try again later"
    default_code = "unavailable"


UNSTORABLE = "a value holds characters the database cannot store (such as NUL)"


def exception_handler(exc, context):
    """DRF's handler, plus the domain errors that views let through."""
    if isinstance(exc, ArtifactError):
        exc = exceptions.ValidationError({"file": [str(exc)]})
    elif isinstance(exc, VersionConflict):
        exc = Conflict(str(exc))
    elif isinstance(exc, NameTaken):
        exc = Conflict(exc.message)
    elif isinstance(exc, StorageUnavailable):
        exc = ServiceUnavailable(str(exc))
    elif isinstance(exc, DataError):  # e.g. a NUL byte that reached a query: bad input
        exc = exceptions.ValidationError({"detail": [UNSTORABLE]})
    elif isinstance(exc, DjangoValidationError):  # a model's own check of its input
        exc = exceptions.ValidationError({"detail": exc.messages})
    elif isinstance(exc, RequestDataTooBig):  # a JSON or form body (DRF reads it whole)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        exc = PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    return drf_exception_handler(exc, context)


class SlugField(serializers.SlugRelatedField):
    """A related object by slug; input that no slug could be (a NUL byte, which PostgreSQL
    refuses in any query) is "no such object" before the database sees it."""

    def to_internal_value(self, data):
        if not isinstance(data, str) or "\x00" in data or len(data) > 200:
            raise serializers.ValidationError(self.unknown(str(data)[:200]))
        try:
            return super().to_internal_value(data)
        except serializers.ValidationError:
            raise serializers.ValidationError(self.unknown(data)) from None

    def unknown(self, value, shown=20):
        """ "No such object" that names the ones there are (domains and base models are few and
        public), so that the caller can pick one."""
        queryset = self.get_queryset().order_by(self.slug_field)
        names = list(queryset.values_list(self.slug_field, flat=True)[: shown + 1])
        noun = queryset.model._meta.verbose_name
        if not names:
            return f"no {noun} {value!r}: there are none yet"
        listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
        return f"no {noun} {value!r}; there are: {listed}"


class StrictSerializer(serializers.Serializer):
    """Rejects fields it does not know instead of silently ignoring them."""

    def validate(self, attrs):
        known = set(self.fields)
        unknown = sorted(set(getattr(self, "initial_data", {}) or {}) - known)
        if unknown:
            raise serializers.ValidationError({name: ["unknown field"] for name in unknown})
        return super().validate(attrs)


class StrictModelSerializer(StrictSerializer, serializers.ModelSerializer):
    pass


class NullsLastOrderingFilter(filters.OrderingFilter):
    """Ordering where missing values (no rating, no measurement yet) sort last either way."""

    def filter_queryset(self, request, queryset, view):
        ordering = self.get_ordering(request, queryset, view)
        if not ordering:
            return queryset
        order = [self.expression(queryset.model, f) for f in ordering]
        if not request.query_params.get(self.ordering_param):
            order = search.best_first(queryset, order)  # a search, no order asked: best first
        return queryset.order_by(*order, "-pk")

    @staticmethod
    def expression(model, field):
        name = field.removeprefix("-")
        try:
            nullable = model._meta.get_field(name).null
        except FieldDoesNotExist:
            nullable = True
        # NULLS LAST only where a NULL can be: on a NOT NULL column it would keep PostgreSQL
        # from reading the order off the column's index, and sort the whole table instead.
        nulls_last = True if nullable else None
        if field.startswith("-"):
            return F(name).desc(nulls_last=nulls_last)
        return F(name).asc(nulls_last=nulls_last)
