from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers

from coprocessor.artifact import MAX_LATENTS, MAX_PREFIX_POSITIONS
from coprocessor.expert import COPROCESSOR_KINDS, PREFIX_KIND
from coprocessor.train import OBJECTIVES, TrainConfig
from registry.api import SlugField, StrictModelSerializer, StrictSerializer
from registry.models import (
    BaseModel,
    Domain,
    Expert,
    ExpertVersion,
    is_version_ref,
    slug_validator,
    split_full_name,
)
from registry.parsers import PayloadTooLarge

from .models import Benchmark, Dataset, EvaluationJob, TrainingJob

DEFAULTS = TrainConfig()


class DatasetSerializer(StrictModelSerializer):
    id = serializers.CharField(source="full_name", read_only=True)
    owner = serializers.CharField(source="owner.username", read_only=True)
    domain = SlugField(
        slug_field="slug", queryset=Domain.objects.all(), required=False, allow_null=True
    )
    base_model = SlugField(
        slug_field="slug",
        queryset=BaseModel.objects.all(),
        required=False,
        allow_null=True,
        help_text="count tokens with this base model's tokenizer",
    )
    file = serializers.FileField(write_only=True, help_text="UTF-8 text, or JSONL of {'text'}")
    format = serializers.ChoiceField(
        choices=Dataset.FORMAT_CHOICES, required=False, help_text="default: from the file name"
    )

    class Meta:
        model = Dataset
        fields = [
            "id",
            "owner",
            "name",
            "description",
            "domain",
            "public",
            "file",
            "format",
            "sha256",
            "size",
            "documents",
            "base_model",
            "token_count",
            "created_at",
        ]
        read_only_fields = ["sha256", "size", "documents", "token_count"]

    def validate_file(self, upload):
        if problem := Dataset.size_problem(upload.size, getattr(upload, "too_large", False)):
            raise PayloadTooLarge(problem)
        return upload


class TrainingParamsSerializer(StrictSerializer):
    """Hyper-parameters with the bounds a job may ask for; defaults are TrainConfig's."""

    n_latents = serializers.IntegerField(
        min_value=0,
        max_value=MAX_LATENTS,
        default=DEFAULTS.expert.n_latents,
        help_text="latents of the coprocessor (0: none, a static prefix alone)",
    )
    prefix_positions = serializers.IntegerField(
        min_value=0,
        max_value=MAX_PREFIX_POSITIONS,
        required=False,
        help_text="positions of the static prefix (0: none, a coprocessor alone; default: "
        "sized to the training text, 16 to 256 as it grows)",
    )
    objective = serializers.ChoiceField(
        choices=OBJECTIVES,
        default=DEFAULTS.objective,
        help_text="what the prefix learns from its windows: next_token (the text's own next "
        "tokens), distill (the base model's predictions when it has read the text just before "
        "each window) or mix (half each)",
    )
    teacher_context = serializers.IntegerField(
        min_value=0,
        max_value=4096,
        default=DEFAULTS.teacher_context,
        help_text="tokens of text before each window the distillation teacher reads",
    )
    evaluations = serializers.IntegerField(
        min_value=0,
        max_value=100,
        default=DEFAULTS.evaluations,
        help_text="checks on a validation slice held out of the training text (0: none: no "
        "early stop, the last checkpoint is published)",
    )
    patience = serializers.IntegerField(
        min_value=1,
        max_value=100,
        default=DEFAULTS.patience,
        help_text="checks without a better validation loss before the job stops early",
    )
    prefix_lr = serializers.FloatField(
        min_value=1e-6,
        max_value=1.0,
        default=DEFAULTS.prefix_lr,
        help_text="learning rate of the static prefix's keys and values",
    )
    replay_windows = serializers.IntegerField(
        min_value=0,
        max_value=64,
        default=DEFAULTS.replay_windows,
        help_text="windows of the base model's own text per step, which hold the expert to "
        "the base model off its domain",
    )
    coexist = serializers.FloatField(
        min_value=0.0,
        max_value=1.0,
        default=DEFAULTS.coexist,
        help_text="share of the steps in which the prefix trains beside another (the base "
        "model's cache over its own text), for an expert meant to be composed with others "
        "(measured: the default composes as well at 5 CPU-minutes; docs/method.md)",
    )
    prefix_snippets = serializers.IntegerField(
        min_value=1,
        max_value=MAX_PREFIX_POSITIONS,
        default=DEFAULTS.prefix_snippets,
        help_text="stretches of the corpus a new prefix is initialised from",
    )
    kind = serializers.ChoiceField(
        choices=[PREFIX_KIND, *COPROCESSOR_KINDS],
        required=False,
        help_text="what the expert is: prefix (no latents: the default without them) or, with "
        "latents, its coprocessor: lora (deltas on the base model's weights, the default) or "
        "full (a trainable copy)",
    )
    lora_rank = serializers.IntegerField(
        min_value=1,
        max_value=256,
        default=DEFAULTS.expert.lora_rank,
        help_text="rank of the coprocessor's LoRA deltas",
    )
    ahead_tokens = serializers.IntegerField(
        min_value=1,
        max_value=128,
        default=DEFAULTS.ahead_tokens,
        help_text="tokens after each coprocessor point that carry its loss",
    )
    window = serializers.IntegerField(
        min_value=32,
        max_value=8192,
        default=DEFAULTS.window,
        help_text="tokens per training window; with the teacher's text before it, at most the "
        "base model's context",
    )
    positions_per_window = serializers.IntegerField(
        min_value=1,
        max_value=64,
        default=DEFAULTS.positions_per_window,
        help_text="coprocessor points per window",
    )
    windows_per_step = serializers.IntegerField(
        min_value=1,
        max_value=64,
        default=DEFAULTS.windows_per_step,
        help_text="windows of the training text per step",
    )
    grad_accum = serializers.IntegerField(
        min_value=1,
        max_value=64,
        default=DEFAULTS.grad_accum,
        help_text="batches whose gradients add up to one step",
    )
    steps = serializers.IntegerField(
        min_value=1,
        max_value=1_000_000,
        default=DEFAULTS.steps,
        help_text="the most steps; the time budget usually ends a job first",
    )
    time_budget_s = serializers.FloatField(
        min_value=1,
        required=False,
        help_text="training stops after this many seconds (default and most: settings)",
    )
    lr = serializers.FloatField(
        min_value=1e-6,
        max_value=1.0,
        default=DEFAULTS.lr,
        help_text="learning rate of the coprocessor (the prefix has prefix_lr)",
    )
    warmup_steps = serializers.IntegerField(
        min_value=0,
        max_value=100_000,
        default=DEFAULTS.warmup_steps,
        help_text="steps of linear warm-up before the cosine decay over the budget",
    )
    seed = serializers.IntegerField(
        min_value=0,
        max_value=2**31 - 1,
        default=DEFAULTS.seed,
        help_text="seeds the initialisation and the windows drawn",
    )
    checkpoint_every = serializers.IntegerField(
        min_value=1,
        max_value=100_000,
        default=DEFAULTS.checkpoint_every,
        help_text="steps between checkpoints a retried job resumes from",
    )

    @staticmethod
    def kind_of(n_latents, asked):
        """The kind ``asked`` for, or the latents' default; a kind they contradict is an
        error (``CoprocessorConfig`` would silently call an expert without latents a prefix)."""
        if asked is None:
            return COPROCESSOR_KINDS[0] if n_latents else PREFIX_KIND
        if (asked == PREFIX_KIND) == bool(n_latents):
            raise serializers.ValidationError(
                {
                    "kind": [
                        "prefix is an expert without latents, lora and full are coprocessors "
                        f"with them: n_latents {n_latents} cannot be kind {asked!r}"
                    ]
                }
            )
        return asked

    def validate(self, attrs):
        attrs = super().validate(attrs)
        attrs.setdefault("time_budget_s", TrainingJob.default_time_budget())
        try:  # TrainingJob.start checks it too; here the error names its field
            TrainingJob.check_time_budget(attrs["time_budget_s"])
        except DjangoValidationError as exc:
            raise serializers.ValidationError({"time_budget_s": exc.messages}) from None
        rows = attrs["windows_per_step"] + attrs["replay_windows"]
        step_tokens = rows * attrs["positions_per_window"] * attrs["window"]
        if step_tokens > settings.LATENTRY_MAX_STEP_TOKENS:
            raise serializers.ValidationError(
                {
                    "windows_per_step": [
                        f"(windows_per_step + replay_windows) x positions_per_window x window is "
                        f"{step_tokens}, over the limit of {settings.LATENTRY_MAX_STEP_TOKENS} "
                        "tokens a step (LATENTRY_MAX_STEP_TOKENS): a step must fit a worker's "
                        "memory"
                    ]
                }
            )
        if not (attrs["n_latents"] or attrs.get("prefix_positions", 1)):
            raise serializers.ValidationError(
                {
                    "n_latents": [
                        "an expert needs latents, a static prefix (prefix_positions) or both"
                    ]
                }
            )
        attrs["kind"] = self.kind_of(attrs["n_latents"], attrs.get("kind"))
        needed = DEFAULTS.min_prefix + attrs["ahead_tokens"] + attrs["positions_per_window"]
        if attrs["window"] < needed:
            raise serializers.ValidationError(
                {"window": [f"must be at least {needed} (16 + ahead_tokens + positions)"]}
            )
        return attrs


class JobSerializer(serializers.ModelSerializer):
    """Fields every job shows."""

    created_by = serializers.CharField(source="created_by.username", read_only=True)
    progress_pct = serializers.FloatField(read_only=True)
    datasets = serializers.SerializerMethodField()
    queue = serializers.SerializerMethodField(
        help_text="while queued: place (1: next), ahead, running and why; else null"
    )

    job_fields = [
        "id",
        "created_by",
        "status",
        "cancel_requested",
        "queue",
        "step",
        "total_steps",
        "steps_estimated",
        "progress_pct",
        "loss",
        "tokens_per_s",
        "eta_s",
        "worker",
        "device",
        "attempts",
        "error",
        "created_at",
        "started_at",
        "heartbeat_at",
        "finished_at",
        "datasets",
    ]

    def get_datasets(self, job) -> list[str]:
        return [d.full_name for d in job.datasets.all()]

    def get_queue(self, job) -> dict | None:
        return job.queue_position()


class TrainingJobSerializer(JobSerializer):
    expert = serializers.CharField(source="expert.full_name", read_only=True)
    base_model = serializers.CharField(source="base_model.slug", read_only=True)
    version = serializers.SerializerMethodField()

    class Meta:
        model = TrainingJob
        fields = JobSerializer.job_fields + [
            "expert",
            "base_model",
            "params",
            "train_tokens",
            "checkpoint_step",
            "history",
            "validation",
            "stopped",
            "kept_step",
            "within_harm_bound",
            "outcome",
            "visibility",
            "version",
        ]
        read_only_fields = fields

    def get_version(self, job) -> int | None:
        version = job.published_version
        return version.number if version else None


class TrainingJobCreateSerializer(StrictSerializer):
    expert = serializers.CharField(
        help_text="an expert of yours by name; created if it does not exist (give domain)"
    )
    domain = SlugField(slug_field="slug", queryset=Domain.objects.all(), required=False)
    base_model = SlugField(slug_field="slug", queryset=BaseModel.objects.all(), required=False)
    visibility = serializers.ChoiceField(
        choices=Expert.VISIBILITY_CHOICES,
        required=False,
        help_text="the expert's visibility once the job publishes; default: private when one "
        "of the datasets is private, else unchanged (a new expert: public)",
    )
    datasets = serializers.ListField(
        child=serializers.CharField(),
        min_length=1,
        max_length=TrainingJob.MAX_DATASETS,
        help_text="owner/name each",
    )
    params = serializers.DictField(required=False, default=dict)

    def validate_expert(self, name):
        name = name.rsplit("/", 1)[-1] if name.startswith(self.user.username + "/") else name
        if "/" in name:
            raise serializers.ValidationError("you can only train your own experts")
        slug_validator(name)
        return name

    def validate_datasets(self, names):
        datasets = resolve_datasets(self.user, names)
        try:  # here, before a new expert is made for the job
            TrainingJob.check_trainable(datasets)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from None
        return datasets

    def validate_params(self, params):
        checked = TrainingParamsSerializer(data=params)
        if not checked.is_valid():
            raise serializers.ValidationError(checked.errors)
        return dict(checked.validated_data)

    def validate(self, attrs):
        attrs = super().validate(attrs)
        expert = Expert.objects.filter(owner=self.user, name=attrs["expert"]).first()
        if expert is None:
            if "domain" not in attrs:
                raise serializers.ValidationError(
                    {"domain": ["needed to create the new expert " + attrs["expert"]]}
                )
            base = attrs.get("base_model") or BaseModel.objects.order_by("created_at").first()
            if base is None:
                raise serializers.ValidationError({"base_model": ["no base model is imported"]})
            attrs["base_model"] = base
        else:
            if attrs.get("base_model", expert.base_model) != expert.base_model:
                raise serializers.ValidationError(
                    {"base_model": [f"{expert.full_name} is for {expert.base_model.slug}"]}
                )
            attrs["base_model"] = expert.base_model
        attrs["expert_obj"] = expert
        try:
            TrainingJob.check_window(attrs["base_model"], TrainingJob.span(attrs["params"]))
        except DjangoValidationError as exc:
            raise serializers.ValidationError({"params": {"window": exc.messages}}) from None
        return attrs

    @property
    def user(self):
        return self.context["request"].user


def resolve_datasets(user, names):
    found, missing = [], []
    for name in names:
        owner, _, short = name.rpartition("/")
        dataset = (
            Dataset.objects.usable_by(user)
            .filter(owner__username=owner or user.username, name=short)
            .first()
        )
        (found if dataset else missing).append(dataset or name)
    if missing:
        raise serializers.ValidationError(f"no such dataset you can use: {', '.join(missing)}")
    return found


class EvaluationJobSerializer(JobSerializer):
    expert = serializers.CharField(source="version.expert.full_name", read_only=True)
    version = serializers.IntegerField(source="version.number", read_only=True)
    partner = serializers.CharField(
        source="partner.full_name",
        read_only=True,
        allow_null=True,
        help_text="a pairing's second expert, composed after the version (else null)",
    )

    class Meta:
        model = EvaluationJob
        fields = JobSerializer.job_fields + ["expert", "version", "partner", "params", "result"]
        read_only_fields = fields


class EvaluationJobCreateSerializer(StrictSerializer):
    expert = serializers.CharField(help_text="owner/name")
    version = serializers.IntegerField(min_value=1, required=False, help_text="default: latest")
    datasets = serializers.ListField(
        child=serializers.CharField(), min_length=1, max_length=EvaluationJob.MAX_DATASETS
    )
    window = serializers.IntegerField(min_value=32, max_value=8192, default=256)
    ahead = serializers.IntegerField(min_value=1, max_value=128, default=16)
    max_windows = serializers.IntegerField(min_value=1, max_value=512, default=32)
    split = serializers.ChoiceField(choices=["heldout", "all"], default="heldout")

    def validate_datasets(self, names):
        return resolve_datasets(self.context["request"].user, names)


class PairingCreateSerializer(StrictSerializer):
    partner = serializers.CharField(
        max_length=300,
        help_text="the expert composed after this one: owner/name, owner/name@version or @alias",
    )
    version = serializers.CharField(
        max_length=100,
        required=False,
        default="",
        help_text="which version of this expert: a number or an alias (default: the newest)",
    )

    def validate_partner(self, value):
        name, at, ref = value.partition("@")
        if split_full_name(name) is None or (at and not is_version_ref(ref)):
            raise serializers.ValidationError("owner/name, owner/name@version or owner/name@alias")
        return value

    def validate_version(self, value):
        if value and not is_version_ref(value):
            raise serializers.ValidationError("a version number or an alias")
        return value


class PairingBenchmarkSerializer(serializers.Serializer):
    benchmark = serializers.IntegerField()
    domain = serializers.CharField()
    pairs = serializers.IntegerField()
    reduction_pct = serializers.FloatField(help_text="the composition's gain, %")
    latency_ratio = serializers.FloatField()
    part = serializers.CharField(help_text="the part of this domain")
    part_alone_pct = serializers.FloatField(
        allow_null=True, help_text="that part's own gain here (None: not measured alone)"
    )
    keep = serializers.FloatField(allow_null=True, help_text="reduction_pct / part_alone_pct")


class PairingSerializer(serializers.Serializer):
    composition = serializers.CharField(help_text="a/x@n+b/y@m, as the router takes it")
    job = serializers.IntegerField()
    measured_at = serializers.DateTimeField()
    benchmarks = PairingBenchmarkSerializer(many=True)


class BenchmarkSerializer(serializers.ModelSerializer):
    """A benchmark as the leaderboard shows it: its size and settings, never its text."""

    name = serializers.CharField(source="dataset.name", read_only=True)
    tokens = serializers.IntegerField(source="dataset.token_count", read_only=True)
    pairs = serializers.SerializerMethodField()

    class Meta:
        model = Benchmark
        fields = ["name", "tokens", "pairs", "window", "ahead", "created_at"]
        read_only_fields = fields

    def get_pairs(self, benchmark) -> int:
        return getattr(benchmark, "measured_pairs", None) or benchmark.pairs


class LeaderboardRowSerializer(serializers.ModelSerializer):
    expert = serializers.CharField(source="expert.full_name", read_only=True)
    base_model = serializers.CharField(source="expert.base_model.slug", read_only=True)
    version = serializers.IntegerField(source="number", read_only=True)
    downloads = serializers.IntegerField(source="expert.download_count", read_only=True)
    url = serializers.SerializerMethodField()

    class Meta:
        model = ExpertVersion
        fields = [
            "expert",
            "base_model",
            "version",
            "benchmark_gain",
            "off_domain_change",
            "size",
            "latency_ratio",
            "downloads",
            "benchmarked_at",
            "url",
        ]
        read_only_fields = fields

    def get_url(self, version) -> str:
        return version.expert.get_api_url()
