"""The registry: base models, domains, experts and their versions, reviews, API keys."""

import hashlib
import logging
import re
import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import IntegrityError, models, transaction
from django.db.models import Avg, Count, Exists, OuterRef, Q, Subquery, TextField
from django.db.models import Value as V
from django.db.models.functions import Cast, Concat, Lower
from django.urls import reverse
from django.utils import timezone

from coprocessor.artifact import (
    ArtifactError,
    BaseModelSpec,
    check_finite,
    read_header,
    validate,
)

from . import events, quotas, references, search, storage

logger = logging.getLogger(__name__)

slug_validator = RegexValidator(
    r"^[a-z0-9][a-z0-9._-]{0,99}$",
    "use 1-100 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit",
)

TAG = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
MAX_TAGS = 20

# A version reference after "@": a number, an alias, or "latest" (built in: the newest ready).
VERSION_NUMBER = re.compile(r"[0-9]{1,9}")  # ASCII digits within every database's integer
ALIAS_NAME = re.compile(r"[a-z][a-z0-9-]{0,39}")  # starts with a letter: never a number
LATEST = "latest"


def validate_tags(tags):
    """Tags are a list of at most MAX_TAGS, each 1-40 lowercase letters, digits or '-'."""
    if not isinstance(tags, list):
        raise ValidationError("tags are a list of strings")
    for tag in tags:
        if not isinstance(tag, str) or not TAG.match(tag):
            raise ValidationError(f"{tag!r}: tags are 1-40 lowercase letters, digits or '-'")
    if len(tags) > MAX_TAGS:
        raise ValidationError(f"at most {MAX_TAGS} tags")


def is_version_ref(ref):
    """Whether ``ref`` can follow "@": a version number or an alias name (``latest`` too)."""
    return bool(VERSION_NUMBER.fullmatch(ref) or ALIAS_NAME.fullmatch(ref))


def validate_alias_name(name):
    """ValidationError unless ``name`` is an alias owners may point: a letter, then up to 39
    lowercase letters, digits or '-'; not ``latest``, which always means the newest."""
    if not isinstance(name, str) or not ALIAS_NAME.fullmatch(name):
        raise ValidationError(
            f"{name!r}: an alias is a letter, then up to 39 lowercase letters, digits or '-'"
        )
    if name == LATEST:
        raise ValidationError("'latest' is built in: it is always the newest ready version")


def split_full_name(full_name):
    """``owner/name`` as (owner, name); None for text of any other shape."""
    owner, slash, name = full_name.partition("/")
    if not owner or not slash or not name or "/" in name:
        return None
    return owner, name


class BaseModel(models.Model):
    """A frozen decoder that experts attach to. Imported once, never changed."""

    slug = models.SlugField(max_length=100, unique=True)
    source = models.CharField(max_length=500, help_text="Hub id, local path or GGUF file")
    revision = models.CharField(max_length=100, blank=True)
    hub_id = models.CharField(
        max_length=200,
        blank=True,
        help_text="its id on the Hugging Face Hub (owner/name): exports name it as their base "
        "model; empty when it has none",
    )
    architecture = models.CharField(max_length=100)
    hidden_size = models.PositiveIntegerField()
    num_layers = models.PositiveIntegerField()
    vocab_size = models.PositiveIntegerField()
    context_length = models.PositiveIntegerField(default=2048)
    # The kv-cache's heads and head size, which a static prefix must match (0: not recorded).
    kv_heads = models.PositiveIntegerField(default=0)
    head_dim = models.PositiveIntegerField(default=0)
    fingerprint = models.CharField(max_length=64, help_text="sha256 over config and weights")
    weights_location = models.CharField(max_length=500, blank=True)
    param_shapes = models.JSONField(default=dict, blank=True, help_text="parameter -> shape")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self):
        return self.slug

    @property
    def export_name(self):
        """What an export names as its base model: the Hub id, else the slug (never a path
        on this machine, which means nothing elsewhere)."""
        return self.hub_id or self.slug

    def spec(self):
        return BaseModelSpec(
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            fingerprint=self.fingerprint,
            param_shapes=self.param_shapes,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
        )

    def probe(self, fileobj):
        """Run a validated expert file through this model on a fixed prompt
        (``coprocessor.probe``): ArtifactError when it breaks the numbers. Skipped when
        LATENTRY_PROBE_UPLOADS is off or this process cannot load the weights (serving and
        evaluation still catch such a file, and reject its version)."""
        if not settings.LATENTRY_PROBE_UPLOADS or not self.weights_location:
            return
        from coprocessor import probe  # torch and transformers: only once a file is probed

        try:
            decoder, tokenizer = probe.base_model(self.weights_location, self.fingerprint)
        except Exception as exc:  # this process's weights, not the upload's fault: never a 500
            logger.warning("uploads to %s are not probed here: %s", self.slug, exc)
            return
        fileobj.seek(0)
        probe.check(fileobj.read(), decoder, tokenizer, self.spec())


class Domain(models.Model):
    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class ExpertQuerySet(models.QuerySet):
    def with_related(self):
        """With owner, domain and base model in the same query, but not the base model's
        shapes: a large JSON document naming every weight tensor, decoded once per row if it
        were fetched, that lists and cards never read."""
        return self.select_related("owner", "domain", "base_model").defer(
            "base_model__param_shapes"
        )

    def visible_to(self, user):
        """What ``user`` may open by name: public and unlisted experts, and their own."""
        if user is not None and user.is_authenticated and user.is_staff:
            return self
        visible = Q(visibility__in=[Expert.PUBLIC, Expert.UNLISTED])
        if user is not None and user.is_authenticated:
            visible |= Q(owner=user)
        return self.filter(visible)

    def listed_for(self, user):
        """What shows up in ``user``'s catalog and search: unlisted experts only for the owner."""
        listed = Q(visibility=Expert.PUBLIC)
        if user is not None and user.is_authenticated:
            listed |= Q(owner=user)
        return self.visible_to(user).filter(listed)

    def named(self, full_name):
        """The expert (none or one) addressed as ``owner/name``."""
        parts = split_full_name(full_name)
        if parts is None:
            return self.none()
        return self.filter(owner__username=parts[0], name=parts[1])

    def search(self, text):
        """Those whose name, title, summary or tags hold every word of ``text`` (the first 8),
        annotated with their rank; ``search.best_first`` orders by it (registry/search.py)."""
        return search.search(self, text)

    def with_ready_version(self, kind=None):
        """Those with at least one ready version (of ``kind``, if given)."""
        ready = ExpertVersion.objects.ready()
        if kind:
            ready = ready.filter(kind=kind)
        return self.filter(pk__in=ready.values("expert"))

    def with_latest_version(self):
        """Annotated with ``latest_version``: the number of the newest ready version, or None."""
        newest = ExpertVersion.objects.ready().filter(expert=OuterRef("pk")).order_by("-number")
        return self.annotate(latest_version=Subquery(newest.values("number")[:1]))


class NameTaken(ValidationError):
    """The owner already has an expert of that name (a field error on forms, 409 in the API)."""

    def __init__(self, name):
        super().__init__(f"you already have an expert named {name!r}", code="name_taken")


class OwnReview(PermissionDenied):
    """Owners may not review their own experts (403 in the API and on the pages)."""


class Expert(models.Model):
    PUBLIC, UNLISTED, PRIVATE = "public", "unlisted", "private"
    VISIBILITY_CHOICES = [(PUBLIC, "Public"), (UNLISTED, "Unlisted"), (PRIVATE, "Private")]

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="experts"
    )
    name = models.CharField(max_length=100, validators=[slug_validator])
    title = models.CharField(max_length=200, blank=True)
    summary = models.CharField(max_length=500, blank=True)
    model_card = models.TextField(blank=True, help_text="Markdown; sanitised when shown")
    domain = models.ForeignKey(Domain, on_delete=models.PROTECT, related_name="experts")
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="experts")
    visibility = models.CharField(max_length=10, choices=VISIBILITY_CHOICES, default=PUBLIC)
    license = models.CharField(max_length=100, default="apache-2.0")
    tags = models.JSONField(default=list, blank=True, validators=[validate_tags])
    download_count = models.PositiveBigIntegerField(default=0)
    rating = models.FloatField(null=True, blank=True, help_text="mean stars of its reviews")
    review_count = models.PositiveIntegerField(default=0)
    # Perplexity reduction (%) of the newest ready version, measured by the platform: on the
    # domain's benchmarks where it has been measured there, else on the owner's own data.
    BENCHMARK, OWNER_DATA = "benchmark", "owner-data"
    GAIN_SOURCE_CHOICES = [(BENCHMARK, "Domain benchmark"), (OWNER_DATA, "Owner's data")]
    measured_gain = models.FloatField(null=True, blank=True)
    gain_source = models.CharField(
        max_length=12, choices=GAIN_SOURCE_CHOICES, null=True, blank=True, default=None
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Name, title, summary and tags lower-cased in one column the database keeps up to date:
    # search (registry/search.py) reads one column, not four case-folded ones. On PostgreSQL a
    # full-text GIN index over it (migration 0010) finds words by their start without a scan.
    search_text = models.GeneratedField(
        expression=Lower(
            Concat(
                "name",
                V(" "),
                "title",
                V(" "),
                "summary",
                V(" "),
                Cast("tags", TextField()),
                output_field=TextField(),
            )
        ),
        output_field=TextField(),
        db_persist=True,
    )

    objects = ExpertQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="unique_expert_per_owner")
        ]
        indexes = [
            models.Index(fields=["-download_count"]),
            models.Index(fields=["-created_at"]),
            models.Index(fields=["visibility", "domain"]),
        ]
        ordering = ["-created_at"]

    def __str__(self):
        return self.full_name

    @property
    def full_name(self):
        return f"{self.owner.username}/{self.name}"

    def get_api_url(self):
        """Its address in the API (the pages' is its HTML page's)."""
        return reverse("api:expert-detail", args=[self.owner.username, self.name])

    @classmethod
    def check_name_free(cls, owner, name):
        """NameTaken if ``owner`` already has an expert called ``name``."""
        if cls.objects.filter(owner=owner, name=name).exists():
            raise NameTaken(name)

    @classmethod
    def create_for(cls, owner, **fields):
        """Create ``owner``'s expert; NameTaken if they already have one of that name (even
        when another request made it since a check_name_free)."""
        try:
            with transaction.atomic():  # a savepoint: the caller's transaction stays usable
                return cls.objects.create(owner=owner, **fields)
        except IntegrityError:
            raise NameTaken(fields.get("name")) from None

    def latest_ready_version(self):
        return self.versions.ready().light().order_by("-number").first()

    def refresh_measured_gain(self):
        """Set the catalog's figure from the newest ready version: its benchmark gain if it
        has one, else its gain on the owner's held-out data, else none."""
        with transaction.atomic():
            # The expert's row lock, which publishing holds too: a version published meanwhile
            # is either seen here as the newest or refreshes the figure after this one.
            Expert.objects.select_for_update().filter(pk=self.pk).first()
            latest = self.latest_ready_version()
            gain, source = latest.measured_gain() if latest is not None else (None, None)
            Expert.objects.filter(pk=self.pk).update(measured_gain=gain, gain_source=source)
        self.measured_gain, self.gain_source = gain, source

    def version_at(self, ref):
        """The version ``ref`` names (a number, an alias, ``latest`` or ""), or None. Ready
        versions only for ``latest``; a number or an alias names whatever it points at."""
        return self.versions.at(ref).first()

    def check_room_for_alias(self):
        """ValidationError if the expert has LATENTRY_MAX_ALIASES aliases already."""
        limit = settings.LATENTRY_MAX_ALIASES
        if limit and self.aliases.count() >= limit:
            raise ValidationError(f"an expert has at most {limit} aliases: remove one first")

    def move_alias(self, user, name, number):
        """Point alias ``name`` at version ``number`` (None: remove it), recorded as an
        AliasMove, in one transaction; None if it already pointed there. Requests that resolved
        the alias before keep the version they got. ValidationError for a bad name, a version
        that is not ready, or one alias too many."""
        validate_alias_name(name)
        with transaction.atomic():
            Expert.objects.select_for_update().get(pk=self.pk)  # moves of one expert take turns
            alias = self.aliases.select_related("version").filter(name=name).first()
            before = alias.version.number if alias is not None else None
            if alias is None and number is not None:
                self.check_room_for_alias()
            if before == number:  # already there: nothing moves, nothing is recorded
                return None
            if number is None:
                if alias is None:
                    raise ValidationError(f"{self.full_name} has no alias {name!r}")
                alias.delete()
            else:
                version = self.versions.ready().light().filter(number=number).first()
                if version is None:
                    raise ValidationError(f"{self.full_name} has no ready version {number}")
                VersionAlias.objects.update_or_create(
                    expert=self, name=name, defaults={"version": version}
                )
            move = AliasMove.objects.create(
                expert=self, alias=name, from_number=before, to_number=number, moved_by=user
            )
            events.emit(self.owner_id, events.ALIAS_MOVED, move.as_event())
        return move

    def reviewable_by(self, user):
        """Whether ``user`` may review it: any signed-in user but its owner."""
        return user.is_authenticated and user.pk != self.owner_id

    def check_reviewer(self, user):
        """OwnReview unless ``user`` may review it."""
        if not self.reviewable_by(user):
            raise OwnReview("you cannot review your own expert")

    def save_review(self, user, stars, text=""):
        """Save ``user``'s review, replacing theirs if they wrote one: (review, created).

        One review per user and expert, so a second one is an edit of the first. OwnReview
        if ``user`` owns the expert."""
        self.check_reviewer(user)
        review, created = Review.objects.update_or_create(
            user=user, expert=self, defaults={"stars": stars, "text": text}
        )
        self.update_rating()
        return review, created

    def next_version_number(self):
        last = self.versions.aggregate(models.Max("number"))["number__max"]
        return (last or 0) + 1

    def update_rating(self):
        stats = self.reviews.aggregate(mean=Avg("stars"), count=Count("id"))
        Expert.objects.filter(pk=self.pk).update(rating=stats["mean"], review_count=stats["count"])

    def count_download(self):
        Expert.objects.filter(pk=self.pk).update(download_count=models.F("download_count") + 1)

    def delete_with_artifacts(self):
        """Delete the expert and, once committed, the stored files no other version uses."""
        keys = list(self.versions.values_list("artifact_key", flat=True))
        with transaction.atomic():
            self.delete()
            transaction.on_commit(lambda: [references.discard_unused(key) for key in keys])


class VersionConflict(Exception):
    """The version number is taken (maybe by an upload that raced this one)."""


class CopyOfAnother(VersionConflict):
    """The bytes are already published by another user's expert: a copy is not a second
    expert (409, naming the original where the uploader may see it)."""


class ExpertVersionQuerySet(models.QuerySet):
    def ready(self):
        """Versions that may be routed to and downloaded."""
        return self.filter(status=ExpertVersion.READY)

    def light(self):
        """Without the large JSON columns that routing and pages never read: the file's config
        (up to LATENTRY_MAX_CONFIG_BYTES, decoded per row if fetched) and the routing profile."""
        return self.defer("config", "routing_profile")

    def newest_ready(self):
        """Each expert's newest ready version (of those in the queryset's experts): the one
        `owner/name` means. "No newer ready version" is an anti-join, which PostgreSQL
        estimates well; a correlated "pk = (the newest)" made it plan for a handful of rows."""
        newer = ExpertVersion.objects.filter(
            status=ExpertVersion.READY, expert=OuterRef("expert"), number__gt=OuterRef("number")
        )
        return self.ready().exclude(Exists(newer))

    def at(self, ref):
        """The versions ``ref`` names, newest first: all ready ones for "" or ``latest``, the
        one numbered ``ref``, or the one alias ``ref`` points at (none for anything else).
        One query either way: an alias is a join, so a move cannot fall between two reads."""
        if ref in ("", LATEST):
            return self.ready().order_by("-number")
        if VERSION_NUMBER.fullmatch(ref):
            return self.filter(number=int(ref))
        if ALIAS_NAME.fullmatch(ref):
            return self.filter(aliases__name=ref)
        return self.none()


class ExpertVersion(models.Model):
    """A published expert file. Ready from its publication (which validates it) until a later
    check of its bytes fails: then rejected, with the reason, and never used again."""

    READY, REJECTED = "ready", "rejected"
    STATUS_CHOICES = [(READY, "Ready"), (REJECTED, "Rejected")]
    KIND_CHOICES = [("lora", "LoRA"), ("full", "Full copy"), ("prefix", "Static prefix")]

    expert = models.ForeignKey(Expert, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    artifact_key = models.CharField(max_length=200, help_text="experts/<sha256>.safetensors")
    sha256 = models.CharField(max_length=64)
    size = models.PositiveBigIntegerField()
    kind = models.CharField(max_length=10, choices=KIND_CHOICES)
    n_latents = models.PositiveIntegerField()
    prefix_positions = models.PositiveIntegerField(default=0, help_text="static prefix length")
    config = models.JSONField(default=dict, blank=True, help_text="settings from the file header")
    metrics = models.JSONField(default=dict, blank=True, help_text="measured by the platform")
    claimed_metrics = models.JSONField(default=dict, blank=True, help_text="said by the publisher")
    status = models.CharField(max_length=12, choices=STATUS_CHOICES, default=READY)
    status_reason = models.TextField(blank=True)
    changelog = models.TextField(blank=True)
    download_count = models.PositiveBigIntegerField(default=0)
    # Lineage: the job that trained it (None for uploads). One version per job, even when a
    # job is delivered twice.
    training_job = models.OneToOneField(
        "training.TrainingJob",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="version",
    )
    # Mean-pooled hidden states of the base model over the training data: what `auto` routing
    # compares prompts with. Empty for uploads until an evaluation computes one.
    routing_profile = models.JSONField(default=list, blank=True)
    # The platform's domain benchmarks (training.Benchmark), summarised from its results there:
    # mean perplexity reduction (%) on its own domain's benchmarks, mean perplexity change (%)
    # on other domains' (positive: attaching it elsewhere hurts), and the forward-pass time
    # with the expert over without it. None until measured.
    benchmark_gain = models.FloatField(null=True, blank=True)
    off_domain_change = models.FloatField(null=True, blank=True)
    latency_ratio = models.FloatField(null=True, blank=True)
    benchmarked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ExpertVersionQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["expert", "number"], name="unique_version_number")
        ]
        ordering = ["-number"]

    def __str__(self):
        return f"{self.expert_id}@{self.number}"

    @property
    def full_name(self):
        """``owner/name@number``: how the router and the API name this version."""
        return f"{self.expert.full_name}@{self.number}"

    @classmethod
    def publish(
        cls,
        expert,
        fileobj,
        *,
        sha256,
        size,
        number=None,
        changelog="",
        claimed_metrics=None,
        training_job=None,
        routing_profile=None,
    ):
        """Validate an expert file, store it, and make it the expert's next ready version.

        1. Validate the safetensors header, then read the values once for NaN and Inf, then
           run the file through the base model on a fixed prompt (``BaseModel.probe``:
           finite values can still overflow it) (ArtifactError: nothing changes).
        2. Lock the expert row so concurrent uploads to one expert take turns.
        3. Store the bytes under their content address (``references.store``), check the
           owner's storage quota (QuotaExceeded), then create the row.
        4. If anything fails after storing, remove the object unless another version uses it.

        Bytes another user's expert already published are refused (``check_not_a_copy``)
        before anything is read, and again under their key's lock after storing them, so
        that two users publishing the same bytes at once take turns.

        A training job publishes at most once: publishing again returns its version.
        """
        cls.check_not_a_copy(expert.owner, sha256)
        quotas.check_room(expert.owner, size, lock=False)  # before reading anything more
        header = read_header(fileobj, size, max_header_bytes=settings.LATENTRY_MAX_HEADER_BYTES)
        validate(
            header,
            expert.base_model.spec(),
            file_size=size,
            max_bytes=settings.LATENTRY_MAX_ARTIFACT_BYTES,
            max_config_bytes=settings.LATENTRY_MAX_CONFIG_BYTES,
        )
        check_finite(fileobj, header)
        expert.base_model.probe(fileobj)
        key = storage.content_key(sha256)
        created = False
        try:
            with transaction.atomic():
                locked = Expert.objects.select_for_update().get(pk=expert.pk)
                if training_job is not None:
                    made = cls.objects.filter(training_job=training_job).first()
                    if made is not None:
                        return made
                number = number or locked.next_version_number()
                if cls.objects.filter(expert=locked, number=number).exists():
                    raise VersionConflict(f"version {number} of {expert.full_name} exists")
                created = references.store(key, fileobj, sha256=sha256)
                cls.check_not_a_copy(locked.owner, sha256)  # a racing copy committed first
                quotas.check_room(locked.owner, size)  # held only until the commit below
                version = cls.objects.create(
                    expert=locked,
                    number=number,
                    artifact_key=key,
                    sha256=sha256,
                    size=size,
                    kind=header.kind,
                    n_latents=header.n_latents,
                    prefix_positions=header.prefix_positions,
                    config=header.config,
                    claimed_metrics=claimed_metrics or {},
                    changelog=changelog,
                    training_job=training_job,
                    routing_profile=routing_profile or [],
                )
                version.expert = locked
                locked.refresh_measured_gain()  # a new newest version has no figures yet
                events.emit(locked.owner_id, events.VERSION_PUBLISHED, version.as_event())
                return version
        except IntegrityError:
            cls._discard(key, created)
            raise VersionConflict(f"version {number} of {expert.full_name} exists") from None
        except BaseException:
            cls._discard(key, created)
            raise

    @classmethod
    def _discard(cls, key, created):
        if created:
            references.discard_unused(key)

    @classmethod
    def check_not_a_copy(cls, owner, sha256):
        """CopyOfAnother if the first ready version with these bytes is another user's: a
        copy is not a second expert. The original is named where ``owner`` may see it."""
        original = (
            cls.objects.ready()
            .filter(sha256=sha256)
            .select_related("expert__owner")
            .order_by("created_at", "pk")
            .first()
        )
        if original is None or original.expert.owner_id == owner.pk:
            return
        if Expert.objects.visible_to(owner).filter(pk=original.expert_id).exists():
            where = f"as {original.expert.full_name} version {original.number}"
        else:
            where = "by another user's expert"
        raise CopyOfAnother(
            f"these bytes are already published {where}: a copy of another user's expert "
            "is not a new expert"
        )

    def open_artifact(self):
        return storage.open_artifact(self.artifact_key)

    def read_verified(self):
        """The stored file's bytes; ArtifactError if they are not the ones published.

        Callers reject the version on ArtifactError (``reject``); this method writes nothing,
        as it runs in loader threads that must not hold a database connection."""
        with self.open_artifact() as stored:
            data = stored.read()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise ArtifactError(f"stored bytes of version {self.number} do not match its sha256")
        return data

    def reject(self, reason):
        """Mark it rejected for ``reason``: never routed or downloaded again. False if it was
        not ready (already rejected, maybe by another process that saw the same failure)."""
        changed = ExpertVersion.objects.filter(pk=self.pk, status=self.READY).update(
            status=self.REJECTED, status_reason=reason
        )
        if changed:
            self.status, self.status_reason = self.REJECTED, reason
            self.expert.refresh_measured_gain()  # it may have been the figure's version
        return bool(changed)

    def record_evaluation(self, reports, *, job_id, profile=None):
        """Merge an evaluation job's reports into the metrics (newest per dataset and split),
        keep ``profile`` as the routing profile if given, and, for the expert's newest ready
        version, set the catalog's measured_gain."""
        with transaction.atomic():
            locked = ExpertVersion.objects.select_for_update().get(pk=self.pk)
            fresh = {(r["dataset"], r["split"]) for r in reports}
            kept = [
                e
                for e in locked.metrics.get("evaluations", [])
                if (e["dataset"], e["split"]) not in fresh
            ]
            measured_at = timezone.now().isoformat()
            evaluations = kept + [{**r, "job": job_id, "measured_at": measured_at} for r in reports]
            # The catalog's figure counts held-out text only: text the expert was trained on
            # (split "all") would flatter it.
            heldout = [e["reduction_pct"] for e in evaluations if e["split"] == "heldout"]
            gain = sum(heldout) / len(heldout) if heldout else None
            locked.metrics = {**locked.metrics, "evaluations": evaluations, "reduction_pct": gain}
            if profile is not None:
                locked.routing_profile = profile
            locked.save(update_fields=["metrics", "routing_profile"])
            locked.expert.refresh_measured_gain()
            locked.announce_evaluation(Expert.OWNER_DATA)

    def is_newest_ready(self):
        """Whether it is its expert's newest ready version: the one ``owner/name`` means, and
        the only one the catalog and the leaderboard show figures of."""
        newest = self.expert.latest_ready_version()
        return newest is not None and newest.pk == self.pk

    def announce_evaluation(self, source):
        """Tell the owner (their webhooks) that the platform measured this version."""
        payload = {**self.as_event(), "source": source}
        events.emit(self.expert.owner_id, events.EVALUATION_RECORDED, payload)

    def measured_gain(self):
        """(gain %, source) as the catalog shows it: the benchmark gain where its domain has
        a benchmark (none until measured there: a figure of another kind never stands in for
        it), else the mean held-out gain on the owner's data, else (None, None)."""
        if self.benchmark_gain is not None:
            return round(self.benchmark_gain, 3), Expert.BENCHMARK
        # training.Benchmark by its reverse name: the registry does not import training.
        if Domain.objects.filter(pk=self.expert.domain_id, benchmarks__isnull=False).exists():
            return None, None
        if (owner_data := self.metrics.get("reduction_pct")) is not None:
            return round(owner_data, 3), Expert.OWNER_DATA
        return None, None

    def as_event(self):
        """The version as webhook payloads show it."""
        return {
            "expert": self.expert.full_name,
            "version": self.number,
            "status": self.status,
            "sha256": self.sha256,
            "size": self.size,
            "owner_data_gain": self.metrics.get("reduction_pct"),
            "benchmark_gain": self.benchmark_gain,
            "off_domain_change": self.off_domain_change,
        }

    def download_filename(self):
        return f"{self.expert.owner.username}--{self.expert.name}--v{self.number}.safetensors"

    def count_download(self, caller):
        """Count a download by ``caller`` (``registry.auth.caller``) once a day: a loop of
        requests cannot buy the catalog's default sort."""
        if not Download.record(self, caller):
            return
        ExpertVersion.objects.filter(pk=self.pk).update(
            download_count=models.F("download_count") + 1
        )
        self.expert.count_download()


class Download(models.Model):
    """That a caller downloaded a version today; kept for the day only. The caller is stored
    as a digest: client addresses are not kept."""

    version = models.ForeignKey(ExpertVersion, on_delete=models.CASCADE, related_name="+")
    caller_digest = models.CharField(max_length=64)
    day = models.DateField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["version", "caller_digest", "day"], name="one_download_per_caller_day"
            )
        ]

    def __str__(self):
        return f"{self.version} on {self.day}"

    @classmethod
    def record(cls, version, caller):
        """True if this is the caller's first download of ``version`` today."""
        today = timezone.now().date()
        digest = hashlib.sha256(f"{settings.SECRET_KEY}:{caller}".encode()).hexdigest()
        _, created = cls.objects.get_or_create(version=version, caller_digest=digest, day=today)
        if created:
            cls.objects.filter(day__lt=today).delete()  # yesterday's no longer count
        return created


class Review(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="reviews"
    )
    expert = models.ForeignKey(Expert, on_delete=models.CASCADE, related_name="reviews")
    stars = models.PositiveSmallIntegerField(
        validators=[MinValueValidator(1), MaxValueValidator(5)]
    )
    text = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "expert"], name="one_review_per_user"),
            models.CheckConstraint(condition=Q(stars__gte=1, stars__lte=5), name="stars_1_to_5"),
        ]
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.user} on {self.expert}: {self.stars}"


class ApiKey(models.Model):
    """A bearer token. Only a sha256 of the secret is stored; the key is shown once."""

    READ, WRITE = "read", "write"
    SCOPES = (READ, WRITE)
    PREFIX = "lat_"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True)
    secret_sha256 = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.prefix}… ({self.name})"

    @classmethod
    def create_for(cls, user, name, scopes=(READ, WRITE)):
        """Make a key; return (api_key, plaintext). The plaintext is never stored.
        ValidationError past the user's cap of unrevoked keys (LATENTRY_MAX_API_KEYS), checked
        with the user's row locked so that concurrent requests cannot both slip under."""
        prefix = secrets.token_hex(4)
        plaintext = f"{cls.PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
        with transaction.atomic():
            get_user_model().objects.select_for_update(no_key=True).filter(pk=user.pk).first()
            limit = settings.LATENTRY_MAX_API_KEYS
            if limit and cls.objects.filter(user=user, revoked_at=None).count() >= limit:
                raise ValidationError(
                    f"you have {limit} API keys, the most one user may hold "
                    "(LATENTRY_MAX_API_KEYS): revoke one first",
                    code="too_many_keys",
                )
            key = cls.objects.create(
                user=user,
                name=name,
                prefix=prefix,
                secret_sha256=hashlib.sha256(plaintext.encode()).hexdigest(),
                scopes=sorted(set(scopes)),
            )
        return key, plaintext

    @classmethod
    def parse_prefix(cls, plaintext):
        if not plaintext.startswith(cls.PREFIX):
            return None
        prefix, _, secret = plaintext[len(cls.PREFIX) :].partition("_")
        return prefix if prefix and secret else None

    def matches(self, plaintext):
        digest = hashlib.sha256(plaintext.encode()).hexdigest()
        return secrets.compare_digest(digest, self.secret_sha256)

    def has_scope(self, scope):
        return scope in self.scopes

    TOUCH_EVERY = timedelta(minutes=1)

    def touch(self):
        """Record use, at most once a minute: a database write per API request is hot-path
        work that "last used" does not need."""
        now = timezone.now()
        if self.last_used_at is not None and now - self.last_used_at < self.TOUCH_EVERY:
            return
        ApiKey.objects.filter(pk=self.pk).update(last_used_at=now)
        self.last_used_at = now

    def revoke(self):
        ApiKey.objects.filter(pk=self.pk, revoked_at=None).update(revoked_at=timezone.now())


class StoredObject(models.Model):
    """A lock row per stored object key. Publishing a file and deleting an unused one both lock
    the key's row first (``references.locked``), so they take turns: a delete that found no row
    naming the bytes cannot remove them while a publish is about to name them."""

    key = models.CharField(max_length=200, primary_key=True)

    def __str__(self):
        return self.key


class VersionAlias(models.Model):
    """A name its owner points at one of an expert's versions: ``owner/name@stable``."""

    expert = models.ForeignKey(Expert, on_delete=models.CASCADE, related_name="aliases")
    name = models.CharField(max_length=40)
    version = models.ForeignKey(ExpertVersion, on_delete=models.CASCADE, related_name="aliases")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["expert", "name"], name="one_alias_name_per_expert")
        ]
        ordering = ["name"]

    def __str__(self):
        return f"{self.expert_id}@{self.name}"


class AliasMove(models.Model):
    """One move of an alias, kept for good: who pointed it, when, from which version to which
    (None: it did not exist before, or was removed)."""

    expert = models.ForeignKey(Expert, on_delete=models.CASCADE, related_name="alias_moves")
    alias = models.CharField(max_length=40)
    from_number = models.PositiveIntegerField(null=True, blank=True)
    to_number = models.PositiveIntegerField(null=True, blank=True)
    moved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    moved_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-moved_at", "-pk"]

    def __str__(self):
        return f"{self.expert_id}@{self.alias}: {self.from_number} -> {self.to_number}"

    def as_event(self):
        return {
            "expert": self.expert.full_name,
            "alias": self.alias,
            "from_version": self.from_number,
            "to_version": self.to_number,
            "moved_by": self.moved_by.username if self.moved_by else None,
            "moved_at": self.moved_at.isoformat(),
        }
