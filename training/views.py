"""REST API of datasets and jobs under /api/v1/. Jobs are visible to their creator and staff."""

from django.db import transaction
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import generics, mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, PermissionDenied, Throttled, ValidationError
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny, IsAuthenticated, IsAuthenticatedOrReadOnly
from rest_framework.response import Response
from rest_framework.reverse import reverse

from registry import references
from registry.api import ApiDefaults, Conflict, UploadThrottle
from registry.models import BaseModel, Domain, Expert, ExpertVersion
from registry.parsers import BoundedJSONParser
from registry.permissions import IsOwnerOrReadOnly

from . import datasets
from .leaderboard import Leaderboard
from .models import Dataset, EvaluationJob, JobLimitReached, TrainingJob
from .serializers import (
    BenchmarkSerializer,
    DatasetSerializer,
    EvaluationJobCreateSerializer,
    EvaluationJobSerializer,
    LeaderboardRowSerializer,
    PairingCreateSerializer,
    PairingSerializer,
    TrainingJobCreateSerializer,
    TrainingJobSerializer,
)


class DatasetViewSet(
    ApiDefaults,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Datasets you can train on: yours and public ones, each at /datasets/<owner>/<name>/ (its
    ``id``, as for experts). Upload is multipart."""

    serializer_class = DatasetSerializer
    permission_classes = [IsAuthenticated, IsOwnerOrReadOnly]
    throttle_classes = [UploadThrottle]
    parser_classes = [MultiPartParser, FormParser, BoundedJSONParser]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no user
            return Dataset.objects.none()
        return Dataset.objects.usable_by(self.request.user).select_related(
            "owner", "domain", "base_model"
        )

    def get_object(self):
        dataset = get_object_or_404(
            self.get_queryset(), owner__username=self.kwargs["owner"], name=self.kwargs["name"]
        )
        self.check_object_permissions(self.request, dataset)
        return dataset

    def perform_create(self, serializer):
        data = serializer.validated_data
        upload = data.pop("file")
        try:
            serializer.instance = datasets.create_from_upload(
                self.request.user, data.pop("name"), upload, data.pop("format", ""), **data
            )
        except datasets.DatasetError as exc:
            raise ValidationError({"file": [str(exc)]}) from None
        except datasets.NameTaken as exc:
            raise Conflict(str(exc)) from None

    def perform_destroy(self, dataset):
        if hasattr(dataset, "benchmark"):
            raise Conflict("this dataset is a domain benchmark; staff remove the benchmark first")
        if dataset.training_jobs.exists() or dataset.evaluation_jobs.exists():
            raise Conflict("jobs used this dataset; it is kept as their record")
        key = dataset.file_key
        with transaction.atomic():
            dataset.delete()
            transaction.on_commit(lambda: references.discard_unused(key))


class JobViewSet(
    ApiDefaults,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    viewsets.GenericViewSet,
):
    permission_classes = [IsAuthenticated]
    model = None

    def get_queryset(self):
        queryset = self.model.objects.prefetch_related("datasets__owner").select_related(
            "created_by"
        )
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no user
            return queryset.none()
        if self.request.user.is_staff:
            return queryset
        return queryset.filter(created_by=self.request.user)

    def create(self, request, *args, **kwargs):
        """Start a job: 202 with the job, whose URL (Location) is where progress is read."""
        create = self.create_serializer_class(data=request.data, context={"request": request})
        create.is_valid(raise_exception=True)
        try:
            with transaction.atomic():  # a refused start leaves no new expert behind
                job = self.start(create.validated_data)
        except JobLimitReached as exc:
            raise Throttled(wait=exc.retry_after, detail=str(exc)) from None
        url = reverse(f"training_api:{self.basename}-detail", args=[job.pk], request=request)
        return Response(
            self.get_serializer(job).data,
            status=status.HTTP_202_ACCEPTED,
            headers={"Location": url},
        )

    @extend_schema(request=None)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        """Cancel: a queued job ends at once, a running one stops at its next step. The
        platform's benchmark measurements: staff only (403)."""
        job = self.get_object()
        if job.finished:
            raise Conflict(f"the job already ended ({job.status})")
        job.cancel_by(request.user)
        return Response(self.get_serializer(job).data)


class TrainingJobViewSet(JobViewSet):
    """Jobs that train an expert of yours on datasets and publish its next version."""

    model = TrainingJob
    serializer_class = TrainingJobSerializer
    create_serializer_class = TrainingJobCreateSerializer

    def get_queryset(self):
        # The published version's number only: not its large JSON columns, for every row.
        jobs = super().get_queryset().select_related("expert__owner", "base_model", "version")
        return jobs.defer("version__routing_profile", "version__metrics", "version__config")

    @extend_schema(request=TrainingJobCreateSerializer, responses={202: TrainingJobSerializer})
    def create(self, request, *args, **kwargs):
        return super().create(request, *args, **kwargs)

    def start(self, data):
        datasets, visibility = data["datasets"], data.get("visibility", "")
        expert = data["expert_obj"] or self._new_expert(data, datasets, visibility)
        return TrainingJob.start(
            self.request.user, expert, datasets, data["params"], visibility=visibility
        )

    def _new_expert(self, data, datasets, visibility):
        return Expert.create_for(  # NameTaken (made since the check): 409
            self.request.user,
            name=data["expert"],
            title=data["expert"],
            domain=data["domain"],
            base_model=data["base_model"],
            visibility=TrainingJob.visibility_for(datasets, visibility) or Expert.PUBLIC,
        )


class EvaluationJobViewSet(JobViewSet):
    """Jobs that measure an expert version's held-out perplexity on datasets."""

    model = EvaluationJob
    serializer_class = EvaluationJobSerializer
    create_serializer_class = EvaluationJobCreateSerializer

    def get_queryset(self):
        return super().get_queryset().select_related("version__expert__owner")

    @extend_schema(request=EvaluationJobCreateSerializer, responses={202: EvaluationJobSerializer})
    def create(self, request, *args, **kwargs):
        return super().create(request, *args, **kwargs)

    def start(self, data):
        experts = Expert.objects.visible_to(self.request.user).named(data["expert"])
        expert = get_object_or_404(experts)
        if expert.owner != self.request.user and not self.request.user.is_staff:
            raise PermissionDenied("only the owner or staff may evaluate an expert")
        versions = expert.versions.ready().order_by("-number")
        if "version" in data:
            versions = versions.filter(number=data["version"])
        version = versions.first()
        if version is None:
            raise Conflict(f"{expert.full_name} has no such ready version to evaluate")
        params = {k: data[k] for k in ("window", "ahead", "max_windows", "split")}
        return EvaluationJob.start(self.request.user, version, data["datasets"], params)


class PairingView(ApiDefaults, generics.GenericAPIView):
    """An expert's measured pairings: what composing it with another expert on one request
    (``model="<base>:a/x+b/y"``) keeps of each one's gain, on the benchmarks of their domains.
    GET: those whose two experts you may see. POST: queue the platform's measurement of one
    (the expert's owner or staff; 202 with the evaluation job)."""

    permission_classes = [IsAuthenticatedOrReadOnly]
    serializer_class = PairingCreateSerializer

    def expert(self):
        name = f"{self.kwargs['owner']}/{self.kwargs['name']}"
        return get_object_or_404(Expert.objects.visible_to(self.request.user).named(name))

    @extend_schema(responses=PairingSerializer(many=True))
    def get(self, request, owner, name):
        return Response(EvaluationJob.pairings(self.expert(), request.user))

    @extend_schema(request=PairingCreateSerializer, responses={202: EvaluationJobSerializer})
    def post(self, request, owner, name):
        expert = self.expert()
        if expert.owner != request.user and not request.user.is_staff:
            raise PermissionDenied("only the expert's owner or staff may measure its pairings")
        data = self.get_serializer(data=request.data)
        data.is_valid(raise_exception=True)
        version = expert.versions.at(data.validated_data["version"]).ready().first()
        partner_name, _, ref = data.validated_data["partner"].partition("@")
        partners = Expert.objects.visible_to(request.user).named(partner_name)
        partner = ExpertVersion.objects.filter(expert__in=partners).at(ref).ready().first()
        if version is None or partner is None:
            missing = expert.full_name if version is None else data.validated_data["partner"]
            raise NotFound(f"{missing} has no such ready version")
        try:
            job = EvaluationJob.start_pairing(request.user, version, partner)
        except JobLimitReached as exc:
            raise Throttled(wait=exc.retry_after, detail=str(exc)) from None
        url = reverse("training_api:evaluationjob-detail", args=[job.pk], request=request)
        body = EvaluationJobSerializer(job, context={"request": request}).data
        return Response(body, status=status.HTTP_202_ACCEPTED, headers={"Location": url})


@extend_schema(
    parameters=[OpenApiParameter("base_model", str, description="only experts of this base model")],
    responses=inline_serializer(
        "Leaderboard",
        {
            "domain": serializers.CharField(),
            "base_model": serializers.CharField(allow_null=True),
            "benchmarks": BenchmarkSerializer(many=True),
            "count": serializers.IntegerField(),
            "next": serializers.URLField(allow_null=True),
            "previous": serializers.URLField(allow_null=True),
            "results": LeaderboardRowSerializer(many=True),
        },
    ),
)
class LeaderboardView(ApiDefaults, generics.ListAPIView):
    """A domain's public experts ranked by their newest ready version's gain on the domain's
    benchmarks, with the benchmarks' sizes. The pairs are the same for every expert of a base
    model: ``?base_model=`` compares like with like."""

    serializer_class = LeaderboardRowSerializer
    permission_classes = [AllowAny]

    def get_queryset(self):
        return self.board().versions

    def board(self):
        if not hasattr(self, "_board"):
            domain = get_object_or_404(Domain, slug=self.kwargs["slug"])
            slug = self.request.query_params.get("base_model")
            base = get_object_or_404(BaseModel, slug=slug) if slug else None
            self._board = Leaderboard.of(domain, base)
        return self._board

    def list(self, request, *args, **kwargs):
        response = super().list(request, *args, **kwargs)
        board = self.board()
        response.data = {
            "domain": board.domain.slug,
            "base_model": board.base_model.slug if board.base_model else None,
            "benchmarks": BenchmarkSerializer(board.benchmarks, many=True).data,
            **response.data,
        }
        return response
