"""REST API of the registry under /api/v1/."""

import hashlib

import django_filters
from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError
from django.db.models import OuterRef, Subquery
from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.permissions import AllowAny, IsAuthenticated, IsAuthenticatedOrReadOnly
from rest_framework.response import Response
from rest_framework.views import APIView

from . import storage, uploads
from .api import Conflict, NullsLastOrderingFilter, PayloadTooLarge, UploadThrottle
from .models import ApiKey, BaseModel, Domain, Expert, ExpertVersion
from .permissions import ApiKeyScope, IsAuthor, IsOwnerOrReadOnly
from .serializers import (
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


class BaseModelViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = BaseModel.objects.all()
    serializer_class = BaseModelSerializer
    lookup_field = "slug"
    filter_backends = []


class DomainViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Domain.objects.select_related("parent")
    serializer_class = DomainSerializer
    lookup_field = "slug"
    filter_backends = []


class ExpertFilter(django_filters.FilterSet):
    q = django_filters.CharFilter(method="search", help_text="words in name, title, summary, tags")
    domain = django_filters.CharFilter(field_name="domain__slug")
    base_model = django_filters.CharFilter(field_name="base_model__slug")
    owner = django_filters.CharFilter(field_name="owner__username")
    visibility = django_filters.ChoiceFilter(choices=Expert.VISIBILITY_CHOICES)

    class Meta:
        model = Expert
        fields = ["q", "domain", "base_model", "owner", "visibility"]

    def search(self, queryset, name, value):
        for word in value.split()[:8]:
            queryset = queryset.filter(search_text__contains=word.lower())
        return queryset


def latest_ready_version():
    return Subquery(
        ExpertVersion.objects.filter(expert=OuterRef("pk"), status=ExpertVersion.READY)
        .order_by("-number")
        .values("number")[:1]
    )


class ExpertViewSet(viewsets.ModelViewSet):
    """Experts, addressed as /api/v1/experts/<owner>/<name>/."""

    serializer_class = ExpertSerializer
    permission_classes = [ApiKeyScope, IsAuthenticatedOrReadOnly, IsOwnerOrReadOnly]
    filter_backends = [django_filters.rest_framework.DjangoFilterBackend, NullsLastOrderingFilter]
    filterset_class = ExpertFilter
    ordering_fields = ["download_count", "rating", "measured_gain", "created_at", "name"]
    ordering = ["-created_at"]

    def get_queryset(self):
        experts = Expert.objects.with_related().annotate(latest_version=latest_ready_version())
        if self.action == "list":
            return experts.listed_for(self.request.user)
        return experts.visible_to(self.request.user)

    def list(self, request, *args, **kwargs):
        """The catalog. Pages seen signed out, searches aside, may be a few seconds old."""
        # Browsing signed out is most of the traffic, and building a page costs about ten times
        # serving a cached one. Signed-in users (who also see their own experts) and searches
        # (too many distinct ones to be worth keeping) are always answered fresh.
        seconds = settings.LATENTRY_CATALOG_CACHE_SECONDS
        if not seconds or request.user.is_authenticated or request.query_params.get("q"):
            return super().list(request, *args, **kwargs)
        uri = request.build_absolute_uri()  # the page links in it are absolute
        key = "catalog:" + hashlib.sha256(uri.encode()).hexdigest()
        data = cache.get(key)
        if data is None:
            data = super().list(request, *args, **kwargs).data
            cache.set(key, data, seconds)
        return Response(data)

    def get_object(self):
        expert = get_object_or_404(
            self.get_queryset(), owner__username=self.kwargs["owner"], name=self.kwargs["name"]
        )
        self.check_object_permissions(self.request, expert)
        return expert

    def perform_create(self, serializer):
        name = serializer.validated_data["name"]
        conflict = Conflict(f"you already have an expert named {name!r}")
        if Expert.objects.filter(owner=self.request.user, name=name).exists():
            raise conflict
        try:
            serializer.save(owner=self.request.user)
        except IntegrityError:
            raise conflict from None

    def perform_destroy(self, expert):
        expert.delete_with_artifacts()


class ExpertChildMixin:
    """For resources under /experts/<owner>/<name>/: the parent is looked up through the gate."""

    def get_expert(self):
        if not hasattr(self, "_expert"):
            self._expert = get_object_or_404(
                Expert.objects.visible_to(self.request.user).select_related("owner", "base_model"),
                owner__username=self.kwargs["owner"],
                name=self.kwargs["name"],
            )
        return self._expert


class ExpertVersionViewSet(
    ExpertChildMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    viewsets.GenericViewSet,
):
    """Versions of an expert: list, read, upload (owner, multipart) and download."""

    serializer_class = ExpertVersionSerializer
    permission_classes = [ApiKeyScope, IsAuthenticatedOrReadOnly]
    parser_classes = [MultiPartParser, FormParser, JSONParser]
    throttle_classes = [UploadThrottle]
    lookup_field = "number"
    lookup_value_regex = r"\d+"
    filter_backends = []

    def get_queryset(self):
        return self.get_expert().versions.select_related("expert__owner")

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
            response = storage.download_response(version.artifact_key, version.download_filename())
        except FileNotFoundError:
            raise NotFound("the file of this version is missing from storage") from None
        version.count_download()
        return response


class ReviewViewSet(ExpertChildMixin, viewsets.ModelViewSet):
    """Reviews of an expert; one per user, 1-5 stars."""

    serializer_class = ReviewSerializer
    permission_classes = [ApiKeyScope, IsAuthenticatedOrReadOnly, IsAuthor]
    filter_backends = []
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def get_queryset(self):
        return self.get_expert().reviews.select_related("user")

    def perform_create(self, serializer):
        expert = self.get_expert()
        if expert.owner == self.request.user:
            raise PermissionDenied("you cannot review your own expert")
        conflict = Conflict("you have already reviewed this expert; edit that review instead")
        if expert.reviews.filter(user=self.request.user).exists():
            raise conflict
        try:
            serializer.save(user=self.request.user, expert=expert)
        except IntegrityError:
            raise conflict from None
        expert.update_rating()

    def perform_update(self, serializer):
        serializer.save()
        self.get_expert().update_rating()

    def perform_destroy(self, review):
        review.delete()
        self.get_expert().update_rating()


class ApiKeyViewSet(
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Your API keys. The secret is in the creation response only; DELETE revokes."""

    serializer_class = ApiKeySerializer
    permission_classes = [ApiKeyScope, IsAuthenticated]
    filter_backends = []

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
