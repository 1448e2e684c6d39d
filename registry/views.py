"""REST API of the registry under /api/v1/."""

import hashlib

from django.conf import settings
from django.core.cache import caches
from django.core.handlers.asgi import ASGIRequest
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny, IsAuthenticated, IsAuthenticatedOrReadOnly
from rest_framework.response import Response
from rest_framework.views import APIView

from . import storage, uploads
from .api import (
    AnnounceThrottle,
    ApiDefaults,
    NullsLastOrderingFilter,
    UploadThrottle,
)
from .auth import caller
from .filters import ExpertFilter
from .models import ApiKey, BaseModel, Domain, Expert, ExpertVersion
from .parsers import BoundedJSONParser, PayloadTooLarge
from .permissions import IsAuthor, IsOwnerOrReadOnly
from .serializers import (
    AliasMoveSerializer,
    AliasPointSerializer,
    AliasSerializer,
    ApiKeySerializer,
    BaseModelSerializer,
    DomainSerializer,
    ExpertSerializer,
    ExpertVersionSerializer,
    NewApiKeySerializer,
    ReviewSerializer,
    VersionUploadSerializer,
)


class HealthView(APIView):
    """Liveness for load balancers and monitors: answers without touching the database."""

    # No authentication: a monitor's stale or revoked key must not turn "up" into a 401.
    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(responses=inline_serializer("Health", {"status": serializers.CharField()}))
    def get(self, request):
        return Response({"status": "ok"})


class BaseModelViewSet(ApiDefaults, viewsets.ReadOnlyModelViewSet):
    queryset = BaseModel.objects.all()
    serializer_class = BaseModelSerializer
    lookup_field = "slug"


class DomainViewSet(ApiDefaults, viewsets.ReadOnlyModelViewSet):
    queryset = Domain.objects.select_related("parent")
    serializer_class = DomainSerializer
    lookup_field = "slug"


def full_name(kwargs):
    """The ``owner/name`` of an expert's URL."""
    return f"{kwargs['owner']}/{kwargs['name']}"


class ExpertViewSet(ApiDefaults, viewsets.ModelViewSet):
    """Experts, addressed as /api/v1/experts/<owner>/<name>/."""

    serializer_class = ExpertSerializer
    permission_classes = [IsAuthenticatedOrReadOnly, IsOwnerOrReadOnly]
    filter_backends = [DjangoFilterBackend, NullsLastOrderingFilter]
    filterset_class = ExpertFilter
    ordering_fields = ["download_count", "rating", "measured_gain", "created_at", "name"]
    ordering = ["-created_at"]

    def get_queryset(self):
        experts = Expert.objects.with_related().with_latest_version()
        if self.action == "list":
            return experts.listed_for(self.request.user)
        return experts.visible_to(self.request.user)

    def list(self, request, *args, **kwargs):
        """The catalog. Pages seen signed out, searches too, may be a few seconds old."""
        # Browsing signed out is most of the traffic, and building a page costs about ten times
        # serving a cached one; a search, which ranks every match, costs more. Popular words
        # come back often, and an entry lives LATENTRY_CATALOG_CACHE_SECONDS only, so a flood
        # of distinct searches holds the cache's memory for that long at most. Signed-in users
        # (who also see their own experts) are always answered fresh.
        seconds = settings.LATENTRY_CATALOG_CACHE_SECONDS
        if not seconds or request.user.is_authenticated:
            return super().list(request, *args, **kwargs)
        uri = request.build_absolute_uri()  # the page links in it are absolute
        key = "catalog:" + hashlib.sha256(uri.encode()).hexdigest()
        data = caches["pages"].get(key)
        if data is None:
            data = super().list(request, *args, **kwargs).data
            caches["pages"].set(key, data, seconds)
        return Response(data)

    def get_object(self):
        expert = get_object_or_404(self.get_queryset().named(full_name(self.kwargs)))
        self.check_object_permissions(self.request, expert)
        return expert

    def perform_create(self, serializer):
        serializer.save(owner=self.request.user)  # NameTaken: 409

    def perform_destroy(self, expert):
        expert.delete_with_artifacts()


class ExpertChildMixin:
    """For resources under /experts/<owner>/<name>/: the parent is looked up through the gate."""

    def get_expert(self):
        if not hasattr(self, "_expert"):
            experts = Expert.objects.visible_to(self.request.user).named(full_name(self.kwargs))
            self._expert = get_object_or_404(experts.select_related("owner", "base_model"))
        return self._expert


class ExpertVersionViewSet(
    ApiDefaults,
    ExpertChildMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    viewsets.GenericViewSet,
):
    """Versions of an expert: list, read, upload (owner, multipart) and download. Rejected
    versions are listed with their reason, and cannot be downloaded."""

    serializer_class = ExpertVersionSerializer
    permission_classes = [IsAuthenticatedOrReadOnly]
    parser_classes = [MultiPartParser, FormParser, BoundedJSONParser]
    throttle_classes = [UploadThrottle]
    lookup_url_kwarg = "ref"

    def get_queryset(self):
        return self.get_expert().versions.select_related("expert__owner")

    def get_object(self):
        """The version ``ref`` names: a number, an alias or ``latest`` (the newest ready)."""
        ref = self.kwargs["ref"]
        version = self.get_queryset().at(ref).first()
        if version is None:
            raise NotFound(f"{self.get_expert().full_name} has no version {ref!r}")
        return version

    @extend_schema(
        request={"multipart/form-data": VersionUploadSerializer},
        responses={201: ExpertVersionSerializer},
    )
    def create(self, request, *args, **kwargs):
        expert = self.get_expert()
        if expert.owner != request.user:
            raise PermissionDenied("only the owner may upload versions")
        limit = settings.LATENTRY_MAX_ARTIFACT_BYTES
        # Refuse before reading the body when the client already says it is too large.
        if int(request.META.get("CONTENT_LENGTH") or 0) > limit + 64 * 1024:
            raise PayloadTooLarge(f"upload is over the limit of {limit} bytes")
        upload = VersionUploadSerializer(data=request.data)
        upload.is_valid(raise_exception=True)
        data = upload.validated_data
        file = data["file"]
        version = ExpertVersion.publish(
            expert,
            file,
            sha256=uploads.sha256_of(file),
            size=file.size,
            number=data.get("number"),
            changelog=data.get("changelog", ""),
            claimed_metrics=data.get("claimed_metrics"),
        )
        location = reverse(
            "api:version-detail", args=[expert.owner.username, expert.name, version.number]
        )
        return Response(
            self.get_serializer(version).data,
            status=status.HTTP_201_CREATED,
            headers={"Location": location},
        )

    @extend_schema(
        responses={
            (200, "application/octet-stream"): OpenApiTypes.BINARY,
            302: OpenApiResponse(description="redirect to a short-lived presigned URL"),
        }
    )
    @action(detail=True, methods=["get"])
    def download(self, request, *args, **kwargs):
        version = self.get_object()
        if version.status != ExpertVersion.READY:
            raise NotFound(f"version {version.number} is {version.status}, not downloadable")
        try:
            response = storage.download_response(
                version.artifact_key,
                version.download_filename(),
                asynchronous=isinstance(request._request, ASGIRequest),
            )
        except FileNotFoundError:
            raise NotFound("the file of this version is missing from storage") from None
        version.count_download(caller(request))
        return response


class ReviewViewSet(ApiDefaults, ExpertChildMixin, viewsets.ModelViewSet):
    """Reviews of an expert; one per user, 1-5 stars. Posting a second one edits the first."""

    serializer_class = ReviewSerializer
    permission_classes = [IsAuthenticatedOrReadOnly, IsAuthor]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_queryset(self):
        return self.get_expert().reviews.select_related("user")

    @extend_schema(responses={201: ReviewSerializer, 200: ReviewSerializer})
    def create(self, request, *args, **kwargs):
        """201 with a new review; 200 with the caller's review, edited, if they had one."""
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        review, created = self.get_expert().save_review(request.user, **serializer.validated_data)
        answer = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(self.get_serializer(review).data, status=answer)

    def perform_update(self, serializer):
        serializer.save()
        self.get_expert().update_rating()

    def perform_destroy(self, review):
        review.delete()
        self.get_expert().update_rating()


class AliasViewSet(ApiDefaults, ExpertChildMixin, viewsets.GenericViewSet):
    """Named aliases of an expert's versions (``owner/name@stable``). Anyone who can see the
    expert reads them; its owner points (PUT) and removes (DELETE) them. ``latest`` is built in
    and always the newest ready version. Every move is kept: see ``alias-moves``."""

    serializer_class = AliasSerializer
    permission_classes = [IsAuthenticatedOrReadOnly]
    throttle_classes = [AnnounceThrottle]
    lookup_url_kwarg = "alias"

    def get_queryset(self):
        return self.get_expert().aliases.select_related("version")

    def list(self, request, *args, **kwargs):
        return Response(self.get_serializer(self.get_queryset(), many=True).data)

    def retrieve(self, request, *args, **kwargs):
        alias = self.get_queryset().filter(name=kwargs["alias"]).first()
        if alias is None:
            raise NotFound(f"{self.get_expert().full_name} has no alias {kwargs['alias']!r}")
        return Response(self.get_serializer(alias).data)

    @extend_schema(request=AliasPointSerializer, responses={200: AliasSerializer})
    def update(self, request, *args, **kwargs):
        """Point the alias at a ready version (creating it if new), in one recorded move."""
        point = AliasPointSerializer(data=request.data)
        point.is_valid(raise_exception=True)
        self._move(kwargs["alias"], point.validated_data["version"])
        return self.retrieve(request, *args, **kwargs)

    def destroy(self, request, *args, **kwargs):
        self._move(kwargs["alias"], None)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _move(self, name, number):
        expert = self.get_expert()
        if expert.owner != self.request.user:
            raise PermissionDenied("only the owner may move aliases")
        expert.move_alias(self.request.user, name, number)  # ValidationError: 400


class AliasMoveViewSet(
    ApiDefaults, ExpertChildMixin, mixins.ListModelMixin, viewsets.GenericViewSet
):
    """Every move of the expert's aliases, newest first: who, when, from which version to
    which (null: created, or removed)."""

    serializer_class = AliasMoveSerializer
    permission_classes = [IsAuthenticatedOrReadOnly]

    def get_queryset(self):
        return self.get_expert().alias_moves.select_related("moved_by")


class ApiKeyViewSet(
    ApiDefaults,
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Your API keys. The secret is in the creation response only; DELETE revokes."""

    serializer_class = ApiKeySerializer
    permission_classes = [IsAuthenticated]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no user
            return ApiKey.objects.none()
        return ApiKey.objects.filter(user=self.request.user)

    @extend_schema(responses={201: NewApiKeySerializer})
    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key, plaintext = ApiKey.create_for(
            request.user, serializer.validated_data["name"], serializer.validated_data["scopes"]
        )
        data = NewApiKeySerializer(key).data
        data["key"] = plaintext
        return Response(data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, key):
        key.revoke()
