"""Datasets and the jobs that train or evaluate experts on them.

A job row is the truth about its job: the Celery task only carries the id. Status changes
happen under ``select_for_update``; a worker holds a job by writing its name and a heartbeat,
so a delivery of a job whose worker is alive is dropped and one whose worker died takes over.
"""

import math
import time
from collections import Counter
from datetime import timedelta

from celery import current_app
from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models, transaction
from django.db.models import Count
from django.utils import timezone

from coprocessor.evaluate import POSITIONS_PER_WINDOW
from coprocessor.expert import PREFIX_KIND
from coprocessor.train import TrainConfig
from registry import events, quotas, storage
from registry.models import BaseModel, Domain, Expert, ExpertVersion, slug_validator

MIN_PREFIX = 16  # evaluation reads at least this many tokens before the first ahead token


class JobHeld(Exception):
    """A live worker runs this job; another delivery of it must not."""


class JobLost(Exception):
    """Another worker took this job over (this one looked dead): stop without writing."""


class JobLimitReached(Exception):
    """Starting a job would take the user who starts it past a limit on jobs: too many queued
    or running (LATENTRY_MAX_ACTIVE_JOBS), or started too often (LATENTRY_JOB_START_RATE).
    Each way in answers it its own way (API and pages: 429); ``retry_after`` is how many
    seconds until a start would pass, where only waiting helps."""

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


class NotCancellable(PermissionDenied):
    """The platform's benchmark measurement: the expert's owner may not cancel it (403)."""


class DatasetQuerySet(models.QuerySet):
    def readable_by(self, owner):
        """Datasets a job may read for an expert of ``owner``: their own and public ones,
        never a domain benchmark (the platform's alone to measure), whoever ``owner`` is, staff
        included. What a job reads shapes the expert and the figures shown to others."""
        return self.filter(models.Q(owner=owner) | models.Q(public=True), benchmark__isnull=True)

    def usable_by(self, user):
        """Datasets ``user`` may train or evaluate on: their own and public ones (staff: all
        of them), but never another user's domain benchmark."""
        others_benchmark = models.Q(benchmark__isnull=False) & ~models.Q(owner=user)
        usable = self.exclude(others_benchmark)
        if user.is_staff:
            return usable
        return usable.filter(models.Q(owner=user) | models.Q(public=True))


class Dataset(models.Model):
    TEXT, JSONL = "text", "jsonl"
    FORMAT_CHOICES = [(TEXT, "Plain text"), (JSONL, 'JSON lines ({"text": ...})')]

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="datasets"
    )
    name = models.CharField(max_length=100, validators=[slug_validator])
    description = models.TextField(blank=True)
    domain = models.ForeignKey(
        Domain, null=True, blank=True, on_delete=models.SET_NULL, related_name="datasets"
    )
    public = models.BooleanField(default=False, help_text="others may train on it")
    format = models.CharField(max_length=10, choices=FORMAT_CHOICES)
    file_key = models.CharField(max_length=200, help_text="datasets/<sha256>.<format>")
    sha256 = models.CharField(max_length=64)
    size = models.PositiveBigIntegerField()
    documents = models.PositiveIntegerField(default=0)
    base_model = models.ForeignKey(
        BaseModel, null=True, blank=True, on_delete=models.SET_NULL, related_name="datasets"
    )
    token_count = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="tokens under base_model's tokenizer (null while a worker counts them)",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = DatasetQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="unique_dataset_per_owner")
        ]
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.owner.username}/{self.name}"

    @property
    def full_name(self):
        return str(self)

    @staticmethod
    def size_problem(size, too_large=False):
        """Why a file of ``size`` bytes cannot be a dataset, or "" if it can. ``too_large``: the
        upload handlers stopped keeping its bytes."""
        limit = settings.LATENTRY_MAX_DATASET_BYTES
        if too_large or size > limit:
            return f"file is over the dataset limit of {limit} bytes"
        return ""


class Job(models.Model):
    """What training and evaluation jobs share: status, progress, the worker that holds it."""

    QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
        "queued",
        "running",
        "succeeded",
        "failed",
        "cancelled",
    )
    STATUS_CHOICES = [
        (QUEUED, "Queued"),
        (RUNNING, "Running"),
        (SUCCEEDED, "Succeeded"),
        (FAILED, "Failed"),
        (CANCELLED, "Cancelled"),
    ]
    FINISHED = (SUCCEEDED, FAILED, CANCELLED)
    MAX_DATASETS = 20  # datasets one job may read
    task_name = None  # the Celery task that runs it, by name: models do not import tasks

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+"
    )
    status = models.CharField(max_length=10, choices=STATUS_CHOICES, default=QUEUED)
    cancel_requested = models.BooleanField(default=False)
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0, help_text="0 while not yet known")
    steps_estimated = models.BooleanField(
        default=False,
        help_text="total_steps is an estimate: the time budget, not a step count, ends the job",
    )
    loss = models.FloatField(null=True, blank=True)
    tokens_per_s = models.FloatField(null=True, blank=True)
    eta_s = models.FloatField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, help_text="Celery node holding it")
    device = models.CharField(max_length=20, blank=True, help_text="cpu or cuda")
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True
        ordering = ["-created_at"]

    @property
    def finished(self):
        return self.status in self.FINISHED

    @property
    def progress_pct(self):
        if self.status == self.SUCCEEDED:
            return 100.0
        return 100.0 * self.step / self.total_steps if self.total_steps else 0.0

    def steps_summary(self):
        """ "step 12 of 200", "step 12 of about 170" (estimated from the time budget), or
        "step 12" while the total is not known: what the page, the list and the admin show."""
        if not self.total_steps:
            return f"step {self.step}"
        about = "about " if self.steps_estimated and not self.finished else ""
        return f"step {self.step} of {about}{self.total_steps}"

    def queue_position(self):
        """Where a queued job stands: {"place", "ahead", "running", "reason"}; None once it
        has started or ended. The queue is fair across users (``fair_order``)."""
        if self.status != self.QUEUED:
            return None
        running = sum(kind.objects.filter(status=Job.RUNNING).count() for kind in JOB_KINDS)
        order = [(type(job), job.pk) for job in fair_order()]
        if (type(self), self.pk) not in order:  # its retry waits for storage to come back
            return {
                "place": None,
                "ahead": None,
                "running": running,
                "reason": "waiting to be retried: storage was unavailable",
            }
        ahead = order.index((type(self), self.pk))
        turn = "next" if ahead == 0 else f"{ahead} job{'s' * (ahead > 1)} ahead"
        busy = f"{running} running" if running else "none running"
        return {
            "place": ahead + 1,
            "ahead": ahead,
            "running": running,
            "reason": f"queued, {turn} ({busy}); turns alternate between users",
        }

    def lease_expired(self, now=None):
        lease = timedelta(seconds=settings.LATENTRY_JOB_LEASE_SECONDS)
        return self.heartbeat_at is None or (now or timezone.now()) - self.heartbeat_at > lease

    @classmethod
    def claim(cls, pk, worker, device):
        """Take the job for ``worker``; None if it ended (or never existed).

        Queued jobs are taken, and running ones whose worker stopped heart-beating (it died).
        A running job with a live heartbeat raises JobHeld: someone is on it. A job that has
        been taken LATENTRY_JOB_MAX_ATTEMPTS times (it keeps killing its workers) fails.
        """
        with transaction.atomic():
            job = cls.objects.select_for_update().filter(pk=pk).first()
            if job is None or job.finished:
                return None
            if job.cancel_requested:
                job.finish(cls.CANCELLED, error="cancelled before it started")
                return None
            if job.status == cls.RUNNING and not job.lease_expired():
                raise JobHeld(f"{job} is held by {job.worker}")
            if job.attempts >= settings.LATENTRY_JOB_MAX_ATTEMPTS:
                job.finish(cls.FAILED, error=f"gave up after {job.attempts} attempts")
                return None
            now = timezone.now()
            job.status, job.worker, job.device = cls.RUNNING, worker, device
            job.attempts += 1
            job.heartbeat_at = now
            job.started_at = job.started_at or now
            job.error = ""
            job.save()
            return job

    def _held(self):
        """This attempt's row: a worker writes only while it still holds the job."""
        return type(self).objects.filter(
            pk=self.pk, status=self.RUNNING, worker=self.worker, attempts=self.attempts
        )

    def release(self, reason=""):
        """Give the job back to the queue (a retry will come)."""
        self._held().update(status=self.QUEUED, worker="", heartbeat_at=None, error=reason)

    def report(self, **fields):
        """Write progress and the heartbeat; True if the job should stop (cancel requested).
        Raises JobLost if another worker has taken the job over meanwhile."""
        fields["heartbeat_at"] = timezone.now()
        if not self._held().update(**fields):
            raise JobLost(f"{self} is no longer held by {self.worker} (attempt {self.attempts})")
        for name, value in fields.items():
            setattr(self, name, value)
        return self._held().filter(cancel_requested=True).exists()

    def finish(self, status, *, error="", **fields):
        """Record the end under the row lock, unless the job already ended (first end wins)
        or, for the worker's own ends, another attempt holds it now."""
        with transaction.atomic():
            locked = type(self).objects.select_for_update().get(pk=self.pk)
            if locked.finished:
                return False
            if self.status == self.RUNNING and (locked.worker, locked.attempts) != (
                self.worker,
                self.attempts,
            ):
                return False
            fields.update(status=status, error=error, finished_at=timezone.now())
            type(self).objects.filter(pk=self.pk).update(**fields)
            transaction.on_commit(self.ended, robust=True)
            self.announce_end(status, error)
        for name, value in fields.items():
            setattr(self, name, value)
        return True

    def ended(self):
        """Called once the job's end is committed, however it ended."""

    def request_cancel(self):
        """Queued jobs (and running ones whose worker died) end now; running ones stop at
        their next progress write."""
        with transaction.atomic():
            locked = type(self).objects.select_for_update().get(pk=self.pk)
            if locked.finished:
                return False
            type(self).objects.filter(pk=self.pk).update(cancel_requested=True)
            if locked.status == self.QUEUED or locked.lease_expired():
                type(self).objects.filter(pk=self.pk).update(
                    status=self.CANCELLED, error="cancelled", finished_at=timezone.now()
                )
                transaction.on_commit(self.ended, robust=True)
                self.announce_end(self.CANCELLED, "cancelled")
        self.refresh_from_db()
        return True

    def cancel_by(self, user):
        """``request_cancel`` on behalf of ``user``. NotCancellable for the platform's benchmark
        measurements unless ``user`` is staff: an owner who could cancel them would choose
        which of their versions the leaderboard sees."""
        if self.on_benchmarks and not user.is_staff:
            raise NotCancellable(
                "this job is the platform's benchmark measurement of your version: only staff "
                "may cancel it"
            )
        return self.request_cancel()

    def enqueue(self):
        """Send the job to the workers once the transaction that made it commits."""
        task, pk = current_app.tasks[self.task_name], self.pk
        transaction.on_commit(lambda: task.apply_async((pk,), queue=settings.LATENTRY_JOB_QUEUE))

    def retry(self):
        """Queue a failed or cancelled job again; False if it is in neither state. It starts
        over: a job's checkpoint goes when the job ends."""
        with transaction.atomic():
            locked = type(self).objects.select_for_update().get(pk=self.pk)
            if locked.status not in (self.FAILED, self.CANCELLED):
                return False
            type(self).objects.filter(pk=self.pk).update(
                status=self.QUEUED,
                cancel_requested=False,
                error="",
                finished_at=None,
                worker="",
                attempts=0,
            )
            self.enqueue()
        self.refresh_from_db()
        return True

    @staticmethod
    def active_count(user):
        """Training and evaluation jobs ``user`` started that are queued or running."""
        active = [Job.QUEUED, Job.RUNNING]
        return (
            TrainingJob.objects.filter(created_by=user, status__in=active).count()
            + EvaluationJob.objects.filter(
                created_by=user, status__in=active, on_benchmarks=False
            ).count()
        )

    @classmethod
    def check_datasets(cls, datasets):
        """ValidationError unless a job may read ``datasets``: at most MAX_DATASETS."""
        if len(datasets) > cls.MAX_DATASETS:
            raise ValidationError(f"choose at most {cls.MAX_DATASETS} datasets")

    @staticmethod
    def check_readable(owner, datasets):
        """ValidationError unless a job for an expert of ``owner`` may read every one of
        ``datasets`` (``Dataset.objects.readable_by``), whoever starts it."""
        if held := Benchmark.objects.filter(dataset__in=datasets).select_related("dataset"):
            names = ", ".join(b.dataset.full_name for b in held)
            raise ValidationError(f"domain benchmarks are measured by the platform alone: {names}")
        others = sorted(d.full_name for d in datasets if d.owner_id != owner.pk and not d.public)
        if others:
            raise ValidationError(
                f"the expert's owner may not read the dataset(s) {', '.join(others)}: a job "
                "reads only its expert owner's own datasets and public ones"
            )

    @staticmethod
    def admit(user):
        """Call inside the transaction that creates a job ``user`` starts: JobLimitReached if
        they have LATENTRY_MAX_ACTIVE_JOBS jobs queued or running, or started as many jobs as
        LATENTRY_JOB_START_RATE allows; else this start is counted. The user's row stays locked
        until the commit, so one user's concurrent starts count each other."""
        quotas.lock_user(user)
        limit = settings.LATENTRY_MAX_ACTIVE_JOBS
        if limit and Job.active_count(user) >= limit:
            raise JobLimitReached(
                f"you have {limit} jobs queued or running, the most one user may have "
                "(LATENTRY_MAX_ACTIVE_JOBS): wait for one to end, or cancel one"
            )
        _count_start(user)

    def announce_end(self, status, error):
        """Tell the job's creator (their webhooks) how it ended, once that is committed."""
        event = {self.SUCCEEDED: events.JOB_SUCCEEDED, self.CANCELLED: events.JOB_CANCELLED}
        payload = {
            "job": self.pk,
            "kind": self.kind,
            "platform": self.on_benchmarks,  # queued by the platform itself
            "expert": self.subject(),
            "status": status,
            "error": error,
        }
        events.emit(self.created_by_id, event.get(status, events.JOB_FAILED), payload)


class TrainingJob(Job):
    """Train an expert on datasets and publish the result as the expert's next version."""

    expert = models.ForeignKey(Expert, on_delete=models.CASCADE, related_name="training_jobs")
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="+")
    datasets = models.ManyToManyField(Dataset, related_name="training_jobs")
    params = models.JSONField(default=dict, help_text="hyper-parameters (TrainConfig fields)")
    history = models.JSONField(default=list, blank=True, help_text="[step, seconds, loss]")
    checkpoint_key = models.CharField(max_length=200, blank=True)
    checkpoint_step = models.PositiveIntegerField(default=0)
    resumed_from_step = models.PositiveIntegerField(
        null=True, blank=True, help_text="the checkpoint the last attempt continued from"
    )
    train_tokens = models.PositiveBigIntegerField(default=0)
    visibility = models.CharField(
        max_length=10,
        choices=Expert.VISIBILITY_CHOICES,
        blank=True,
        help_text="the expert's visibility once the job publishes (blank: unchanged)",
    )
    # Stopping in time (coprocessor.watch): the checks of the validation slice held out of the
    # training text and of the reference text, and what the run kept.
    validation = models.JSONField(
        default=list,
        blank=True,
        help_text="checks: step, elapsed_s, validation_loss, reduction_pct, harm_pct",
    )
    stopped = models.CharField(
        max_length=10, blank=True, help_text="done, time, plateau or harm (coprocessor.watch)"
    )
    kept_step = models.PositiveIntegerField(
        null=True, blank=True, help_text="the step whose expert was published"
    )
    within_harm_bound = models.BooleanField(
        null=True,
        blank=True,
        help_text="whether the published expert stayed within LATENTRY_HARM_BOUND_PCT on the "
        "reference text (empty: not watched)",
    )
    outcome = models.TextField(blank=True, help_text="why training stopped and what it kept")

    task_name = "training.train_expert"
    kind = "training"
    on_benchmarks = False  # only evaluations measure benchmarks

    class Meta(Job.Meta):
        pass

    def __str__(self):
        return f"training #{self.pk} → {self.expert}"

    def subject(self):
        return self.expert.full_name

    @classmethod
    def start(cls, user, expert, datasets, params, visibility=""):
        """Queue a job that ``user`` starts to train ``expert``'s next version on ``datasets``,
        the expert becoming ``visibility`` when it publishes (``visibility_for``). ``params``
        are bounded hyper-parameters (serializers.TrainingParamsSerializer); a missing time
        budget gets the default. Every rule of a start is checked here, so no way in skips
        one: ValidationError for the datasets, the window, the time budget and the owner's
        storage quota (QuotaExceeded); JobLimitReached for the user's limits on jobs."""
        cls.check_datasets(datasets)
        cls.check_trainable(datasets)
        cls.check_readable(expert.owner, datasets)
        cls.check_window(expert.base_model, cls.span(params))
        params = {"time_budget_s": cls.default_time_budget(), **params}
        cls.check_time_budget(params["time_budget_s"])
        quotas.check_room(expert.owner, 1, lock=False)  # a full quota: it could not publish
        with transaction.atomic():
            cls.admit(user)
            job = cls.objects.create(
                created_by=user,
                expert=expert,
                base_model=expert.base_model,
                params=params,
                visibility=cls.visibility_for(datasets, visibility),
            )
            job.datasets.set(datasets)
            job.enqueue()
        return job

    @staticmethod
    def visibility_for(datasets, asked=""):
        """The visibility a job gives its expert when it publishes: the one asked for; else
        private when one of ``datasets`` is (private data in, private expert out); else ""
        (the expert's stays as it is)."""
        if asked:
            return asked
        return Expert.PRIVATE if any(not d.public for d in datasets) else ""

    def apply_visibility(self):
        """Give the expert the job's visibility (if it asks for one): call it just before
        publishing, so that the new version is never seen under the old visibility."""
        if self.visibility:
            Expert.objects.filter(pk=self.expert_id).exclude(visibility=self.visibility).update(
                visibility=self.visibility, updated_at=timezone.now()
            )

    @staticmethod
    def longest_time_budget():
        """The most seconds a job may train: the setting, within the job time limit less 5 min."""
        return min(settings.LATENTRY_JOB_MAX_TIME_BUDGET_S, settings.LATENTRY_JOB_TIME_LIMIT - 300)

    @classmethod
    def default_time_budget(cls):
        return float(min(settings.LATENTRY_JOB_TIME_BUDGET_S, cls.longest_time_budget()))

    @classmethod
    def check_time_budget(cls, seconds):
        """ValidationError unless a job may train for ``seconds``: every job stops in time."""
        longest = cls.longest_time_budget()
        if not 0 < seconds <= longest:
            raise ValidationError(
                f"must be at most {longest} s (LATENTRY_JOB_MAX_TIME_BUDGET_S) and more than 0"
            )

    @staticmethod
    def check_trainable(datasets):
        """ValidationError if one of ``datasets`` is a domain benchmark: nobody trains on one,
        its owner included (checked at start, and again when a worker runs the job)."""
        if held := Benchmark.objects.filter(dataset__in=datasets).select_related("dataset"):
            names = ", ".join(b.dataset.full_name for b in held)
            raise ValidationError(f"domain benchmarks are never trained on: {names}")

    @staticmethod
    def span(params):
        """The tokens one training row reads: the window, after the text before it when a
        distillation teacher reads that."""
        config = TrainConfig.from_settings(params)
        return config.window + (config.objective != "next_token") * config.teacher_context

    @staticmethod
    def check_window(base_model, span):
        """ValidationError unless a training window (with the text a teacher reads before it)
        fits the base model's context."""
        if span > base_model.context_length:
            raise ValidationError(
                f"the window plus the text the teacher reads before it ({span} tokens) must "
                f"be at most the base model's context ({base_model.context_length})"
            )

    def ended(self):
        self.discard_checkpoint()

    def discard_checkpoint(self):
        """Remove the checkpoint: it serves only the run that wrote it. If storage is down,
        the object is left unnamed and the sweep (registry.references) removes it later."""
        named = TrainingJob.objects.filter(pk=self.pk).values_list("checkpoint_key", flat=True)
        self.checkpoint_key = ""
        if key := named.first():
            TrainingJob.drop_checkpoint(self.pk, key)

    @classmethod
    def drop_checkpoint(cls, pk, key, **still):
        """Clear job ``pk``'s checkpoint ``key`` if its row still names it (and matches
        ``still``: a run that wrote another one meanwhile keeps it), then remove the object.
        True if it was removed."""
        cleared = cls.objects.filter(pk=pk, checkpoint_key=key, **still).update(checkpoint_key="")
        return bool(cleared) and storage.delete(key)

    @property
    def published_version(self):
        """The version this job published, or None (a job publishes at most one)."""
        return getattr(self, "version", None)  # the reverse one-to-one; cached once read


class EvaluationJob(Job):
    """Measure a version's held-out perplexity, base vs augmented, on datasets."""

    version = models.ForeignKey(
        ExpertVersion, on_delete=models.CASCADE, related_name="evaluation_jobs"
    )
    datasets = models.ManyToManyField(Dataset, related_name="evaluation_jobs")
    params = models.JSONField(default=dict, help_text="window, ahead, max_windows, split")
    result = models.JSONField(default=dict, blank=True, help_text="report per dataset")
    # Queued by the platform to measure the version on domain benchmarks (datasets are the
    # benchmarks' own, params each benchmark's): not counted against the owner's active jobs.
    on_benchmarks = models.BooleanField(default=False)
    # A pairing (``start_pairing``): the version measured composed with this one after it, on
    # the benchmarks of both experts' domains; its figures stay in ``result``, never in the
    # version's own benchmark results.
    partner = models.ForeignKey(
        ExpertVersion,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="paired_evaluations",
        help_text="composed after the version, for a pairing's measurement",
    )

    task_name = "training.evaluate_version"
    kind = "evaluation"

    class Meta(Job.Meta):
        pass

    def __str__(self):
        return f"evaluation #{self.pk} of {self.version.expert}@{self.version.number}"

    def subject(self):
        parts = [self.version, self.partner] if self.partner_id else [self.version]
        return "+".join(part.full_name for part in parts)

    @classmethod
    def start_on_benchmarks(cls, version, benchmarks):
        """Queue the platform's measurement of ``version`` on those of ``benchmarks`` it still
        needs (``_settled``), on behalf of the expert's owner. None if there is nothing to do;
        if the version is not its expert's newest ready one (only that one is ever shown, so
        only that one costs a GPU); or if the owner has LATENTRY_MAX_QUEUED_MEASUREMENTS
        measurements queued or running (the next of theirs to end queues it: ``ended``)."""
        if not version.is_newest_ready():
            return None
        settled = cls._settled(version)
        todo = [b for b in benchmarks if b.pk not in settled]
        if not todo:
            return None
        owner = version.expert.owner
        with transaction.atomic():
            quotas.lock_user(owner)  # the owner's measurements are counted one start at a time
            if cls.measurements_full(owner):
                return None
            params = {"split": "all"}
            return cls._queue(owner, version, [b.dataset for b in todo], params, on_benchmarks=True)

    @staticmethod
    def _settled(version):
        """The pks of the benchmarks ``version`` needs no measurement on now: measured there,
        being measured, or given up on (its measurements there failed or were cancelled
        1 + LATENTRY_BENCHMARK_RETRIES times)."""
        measured = set(
            BenchmarkResult.objects.filter(version=version).values_list("benchmark", flat=True)
        )
        tries = Benchmark.objects.filter(
            dataset__evaluation_jobs__version=version,
            dataset__evaluation_jobs__on_benchmarks=True,
            dataset__evaluation_jobs__partner=None,  # a pairing measures the composition
        ).values_list("pk", "dataset__evaluation_jobs__status")
        active = {pk for pk, status in tries if status in (Job.QUEUED, Job.RUNNING)}
        ended = Counter(pk for pk, status in tries if status in (Job.FAILED, Job.CANCELLED))
        given_up = {pk for pk, n in ended.items() if n > settings.LATENTRY_BENCHMARK_RETRIES}
        return measured | active | given_up

    @staticmethod
    def measurements_full(owner):
        """Whether ``owner`` has LATENTRY_MAX_QUEUED_MEASUREMENTS measurements queued or
        running: more would only make the fair queue longer for everyone."""
        limit = settings.LATENTRY_MAX_QUEUED_MEASUREMENTS
        active = EvaluationJob.objects.filter(
            created_by=owner, on_benchmarks=True, status__in=[Job.QUEUED, Job.RUNNING]
        )
        return bool(limit) and active.count() >= limit

    @classmethod
    def measure_waiting(cls, owner):
        """Queue what ``owner``'s newest ready versions still need measured (a measurement
        that failed or was cancelled, again; a version that waited for a place), as far as
        their cap allows."""
        benchmarks = list(Benchmark.objects.select_related("dataset"))
        if not benchmarks:
            return
        lacking = (
            ExpertVersion.objects.newest_ready()
            .light()
            .filter(expert__owner=owner)
            .annotate(measured=Count("benchmark_results"))
            .filter(measured__lt=len(benchmarks))
            .select_related("expert__owner")
            .order_by("pk")
        )
        for version in lacking:
            if cls.measurements_full(owner):
                return
            cls.start_on_benchmarks(version, benchmarks)

    def ended(self):
        """A measurement that ended makes room for the owner's next one: a failed or cancelled
        one is tried again (at most LATENTRY_BENCHMARK_RETRIES times), a waiting one queued."""
        if self.on_benchmarks:
            EvaluationJob.measure_waiting(self.created_by)

    @classmethod
    def start(cls, user, version, datasets, params=None):
        """Queue a job that ``user`` starts to measure ``version`` on ``datasets``; ``params``
        default to ``as_trained(version)``. Every rule of a start is checked here, so no way in
        skips one: ValidationError if the expert's owner may not read one of the datasets
        (their figures would show in the version's metrics) or the window does not fit the
        base model's context; JobLimitReached for the user's limits on jobs."""
        cls.check_datasets(datasets)
        cls.check_readable(version.expert.owner, datasets)
        params = params if params is not None else cls.as_trained(version)
        cls.check_params(version.expert.base_model, params)
        with transaction.atomic():
            cls.admit(user)
            return cls._queue(user, version, datasets, params)

    @classmethod
    def start_after_training(cls, training_job, version):
        """Queue the evaluation the platform runs when ``training_job`` publishes ``version``:
        on the held-out part of the job's datasets that the owner may read. Counted among the
        job's creator's active jobs but never refused (nobody asked for it); None if no
        dataset is readable."""
        datasets = cls.readable(version, training_job.datasets.all())
        if not datasets:
            return None
        return cls._queue(training_job.created_by, version, datasets, cls.as_trained(version))

    @classmethod
    def start_pairing(cls, user, version, partner):
        """Queue the platform's measurement of ``version`` composed with ``partner`` (after it)
        on the benchmarks of both experts' domains: what composing them keeps of each one's
        gain there (``pairings``). Whether ``user`` may ask (the owner of ``version``'s expert
        or staff, ``partner`` visible to them) is the caller's to check. ValidationError for
        versions that cannot compose or a pair with no benchmark to measure on; JobLimitReached
        past the user's limits (their start rate, and their measurements queued or running).
        A pairing already queued, running or measured is returned as it is."""
        if problem := pairing_problem(version, partner):
            raise ValidationError(problem)
        done = [cls.QUEUED, cls.RUNNING, cls.SUCCEEDED]
        existing = cls.objects.filter(version=version, partner=partner, status__in=done).first()
        if existing is not None:
            return existing
        domains = [version.expert.domain_id, partner.expert.domain_id]
        benchmarks = list(Benchmark.objects.filter(domain__in=domains).select_related("dataset"))
        if not benchmarks:
            raise ValidationError("neither expert's domain has a benchmark to measure them on")
        with transaction.atomic():
            quotas.lock_user(user)
            if cls.measurements_full(user):
                raise JobLimitReached(
                    f"you have {settings.LATENTRY_MAX_QUEUED_MEASUREMENTS} measurements queued "
                    "or running (LATENTRY_MAX_QUEUED_MEASUREMENTS): wait for one to end"
                )
            cls.admit(user)
            datasets = [b.dataset for b in benchmarks]
            return cls._queue(user, version, datasets, {"split": "all"}, True, partner)

    @classmethod
    def pairings(cls, expert, user):
        """The measured pairings of ``expert``'s versions that ``user`` may see (both experts
        visible to them), newest first: the two versions composed and, per benchmark, the
        domain, the composition's gain, the gain of the part of that domain alone, and their
        ratio (what composing keeps)."""
        jobs = (
            cls.objects.filter(status=cls.SUCCEEDED, partner__isnull=False)
            .filter(models.Q(version__expert=expert) | models.Q(partner__expert=expert))
            .select_related(
                "version__expert__owner",
                "version__expert__domain",
                "partner__expert__owner",
                "partner__expert__domain",
            )
            .order_by("-finished_at")
        )
        jobs = list(jobs)
        involved = {e for job in jobs for e in (job.version.expert_id, job.partner.expert_id)}
        visible = set(
            Expert.objects.visible_to(user).filter(pk__in=involved).values_list("pk", flat=True)
        )
        shown = [j for j in jobs if {j.version.expert_id, j.partner.expert_id} <= visible]
        parts = {v.pk for job in shown for v in (job.version, job.partner)}
        alone = {  # every part's own figures, in one query; no finer than a pairing's
            (r.version_id, r.benchmark_id): round(r.reduction_pct, 2)
            for r in BenchmarkResult.objects.filter(version__in=parts)
        }
        return [job.pairing_figures(alone) for job in shown]

    def pairing_figures(self, alone):
        """This pairing's figures; ``alone``: (version pk, benchmark pk) -> its own gain."""
        parts = [self.version, self.partner]
        rows = []
        for measured in self.result.get("pairing", []):
            # the part of the benchmark's domain (the first, when both share it)
            part = next((p for p in parts if p.expert.domain.slug == measured["domain"]), None)
            own = alone.get((part.pk, measured["benchmark"])) if part else None
            keep = round(measured["reduction_pct"] / own, 3) if own else None
            name = part.full_name if part else ""
            rows.append({**measured, "part": name, "part_alone_pct": own, "keep": keep})
        return {
            "composition": "+".join(p.full_name for p in parts),
            "job": self.pk,
            "measured_at": self.finished_at,
            "benchmarks": rows,
        }

    @classmethod
    def _queue(cls, user, version, datasets, params, on_benchmarks=False, partner=None):
        with transaction.atomic():
            job = cls.objects.create(
                created_by=user,
                version=version,
                params=params,
                on_benchmarks=on_benchmarks,
                partner=partner,
            )
            job.datasets.set(datasets)
            job.enqueue()
        return job

    @staticmethod
    def readable(version, datasets):
        """Those of ``datasets`` that a job may read for the version's expert
        (``Dataset.objects.readable_by``): the only ones a version's metrics may come from."""
        owner = version.expert.owner
        return list(Dataset.objects.readable_by(owner).filter(pk__in=[d.pk for d in datasets]))

    @staticmethod
    def measurement_note(version):
        """Why ``version`` shows no benchmark figure, in words for its expert's page: "" when
        it has one, or its domain has no benchmark (owner-data figures stand there)."""
        own = Benchmark.objects.filter(domain=version.expert.domain_id)
        if version.benchmark_gain is not None or not own.exists():
            return ""
        jobs = EvaluationJob.objects.filter(
            version=version, on_benchmarks=True, partner=None, datasets__benchmark__in=own
        )
        latest = jobs.order_by("-created_at").first()
        if latest is None:
            return "Not measured yet: the measurement waits for a place in the queue."
        if latest.status in (Job.QUEUED, Job.RUNNING):
            return f"Not measured yet: the measurement is {latest.status}."
        ended = jobs.filter(status__in=[Job.FAILED, Job.CANCELLED]).distinct().count()
        if latest.status not in (Job.FAILED, Job.CANCELLED):
            return "Not measured yet."
        again = ended <= settings.LATENTRY_BENCHMARK_RETRIES
        return (
            f"Not measured: the platform's measurement {latest.status} ({latest.error}); "
            f"tried {ended} time(s){', it will be tried again' if again else ''}."
        )

    @staticmethod
    def check_params(base_model, params):
        """ValidationError unless the window fits the base model's context and leaves room for
        a prefix of MIN_PREFIX tokens before the ahead tokens."""
        window, ahead = params["window"], params["ahead"]
        if window > base_model.context_length:
            raise ValidationError(
                f"window {window} is over the base model's context ({base_model.context_length})"
            )
        if not 1 <= ahead <= window - MIN_PREFIX:
            limit = window - MIN_PREFIX
            raise ValidationError(f"ahead must be 1 to window - {MIN_PREFIX} ({limit})")

    @staticmethod
    def as_trained(version):
        """Params that measure a version as it was trained: its window and ahead tokens (as
        far as the base model's context allows: the file's config is the uploader's), on
        held-out text."""
        config = version.config if isinstance(version.config, dict) else {}
        training = config.get("training", {})
        training = training if isinstance(training, dict) else {}
        window = min(_int(training.get("window"), 256), version.expert.base_model.context_length)
        window = max(window, 32)
        ahead = min(max(_int(training.get("ahead_tokens"), 16), 1), window - MIN_PREFIX)
        return {"window": window, "ahead": ahead, "max_windows": 32, "split": "heldout"}


def pairing_problem(version, partner):
    """Why two versions cannot be measured composed, or "" (``coprocessor.compose``: static
    prefixes of one base model; two experts, both ready)."""
    if version.expert_id == partner.expert_id:
        return "a pairing is of two different experts"
    if version.expert.base_model_id != partner.expert.base_model_id:
        return "the two experts are trained on different base models"
    for part in (version, partner):
        if part.kind != PREFIX_KIND:
            kind = part.kind
            return f"{part.full_name} has a coprocessor (kind {kind}): only static prefixes compose"
        if part.status != ExpertVersion.READY:
            return f"{part.full_name} is not ready ({part.status})"
    return ""


JOB_KINDS = (TrainingJob, EvaluationJob)


class Benchmark(models.Model):
    """A dataset staff hold out to measure every expert on the same text.

    Every ready version is measured on every benchmark: on its own domain's for the catalog's
    gain and the leaderboard, on the others' for what attaching it elsewhere costs. The text
    is never listed to, read by or trained on by anyone else: only the figures are shown.
    """

    domain = models.ForeignKey(Domain, on_delete=models.CASCADE, related_name="benchmarks")
    dataset = models.OneToOneField(Dataset, on_delete=models.PROTECT, related_name="benchmark")
    added_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    window = models.PositiveIntegerField(default=256, help_text="tokens per held-out window")
    ahead = models.PositiveIntegerField(default=16, help_text="tokens predicted per pair")
    max_windows = models.PositiveIntegerField(default=64, help_text="windows measured at most")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["domain", "created_at"]

    def __str__(self):
        return f"{self.domain.slug}: {self.dataset}"

    def clean(self):
        if self.dataset_id and self.dataset.public:
            raise ValidationError({"dataset": "a public dataset cannot be a benchmark"})
        if self.dataset_id and not self.dataset.owner.is_staff:
            raise ValidationError({"dataset": "a benchmark's dataset must belong to staff"})
        if self.window and self.ahead and not 1 <= self.ahead <= self.window - MIN_PREFIX:
            raise ValidationError({"ahead": f"must be 1 to window - {MIN_PREFIX}"})

    @property
    def params(self):
        return {
            "window": self.window,
            "ahead": self.ahead,
            "max_windows": self.max_windows,
            "split": "all",
        }

    @property
    def pairs(self):
        """How many (window, position) pairs it measures at most."""
        return self.max_windows * POSITIONS_PER_WINDOW

    @classmethod
    def add(cls, user, domain, dataset, **params):
        """Attach ``dataset`` (staff's, not public) to ``domain`` and measure every ready
        version on it (a maintenance task queues the evaluations once this commits)."""
        benchmark = cls(domain=domain, dataset=dataset, added_by=user, **params)
        benchmark.full_clean()
        benchmark.save()
        return benchmark

    def measure_all_later(self):
        task = current_app.tasks["training.measure_on_benchmark"]  # by name: tasks import us
        task.apply_async((self.pk,), queue=settings.LATENTRY_MAINTENANCE_QUEUE)


class BenchmarkResult(models.Model):
    """One version measured on one benchmark by the platform."""

    version = models.ForeignKey(
        ExpertVersion, on_delete=models.CASCADE, related_name="benchmark_results"
    )
    benchmark = models.ForeignKey(Benchmark, on_delete=models.CASCADE, related_name="results")
    job = models.ForeignKey(
        EvaluationJob, null=True, on_delete=models.SET_NULL, related_name="benchmark_results"
    )
    pairs = models.PositiveIntegerField()
    ppl_base = models.FloatField()
    ppl_expert = models.FloatField()
    reduction_pct = models.FloatField()
    latency_ratio = models.FloatField(help_text="forward-pass time with the expert / without")
    measured_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["version", "benchmark"], name="one_result_per_benchmark"
            )
        ]

    def __str__(self):
        return f"{self.version} on {self.benchmark}: {self.reduction_pct:.2f}%"

    @classmethod
    def record(cls, version, benchmark, report, job):
        cls.objects.update_or_create(
            version=version,
            benchmark=benchmark,
            defaults={
                "job": job,
                "pairs": report["pairs"],
                "ppl_base": report["ppl_base"],
                "ppl_expert": report["ppl_expert"],
                "reduction_pct": report["reduction_pct"],
                "latency_ratio": report["latency_ratio"],
                "measured_at": timezone.now(),
            },
        )

    @classmethod
    def summarise_all(cls, **versions):
        """``summarise`` every version selected by ``versions`` (ExpertVersion filters)."""
        for version in ExpertVersion.objects.light().filter(**versions).select_related("expert"):
            cls.summarise(version, announce=False)  # nothing was measured: nothing to announce

    @staticmethod
    def summarise(version, announce=True):
        """Write the version's benchmark summary (ExpertVersion.benchmark_gain and the rest)
        from its results, and refresh its expert's catalog figure."""
        results = list(BenchmarkResult.objects.filter(version=version).select_related("benchmark"))
        domain = version.expert.domain_id
        own = [r.reduction_pct for r in results if r.benchmark.domain_id == domain]
        other = [-r.reduction_pct for r in results if r.benchmark.domain_id != domain]
        ExpertVersion.objects.filter(pk=version.pk).update(
            benchmark_gain=_mean(own),
            off_domain_change=_mean(other),
            latency_ratio=_mean([r.latency_ratio for r in results]),
            benchmarked_at=max((r.measured_at for r in results), default=None),
        )
        version.expert.refresh_measured_gain()
        if announce:
            version.refresh_from_db()  # the event carries the figures just written
            version.announce_evaluation(Expert.BENCHMARK)


def _mean(values):
    """The mean, rounded to two decimals: figures that come from a benchmark's text are shown
    no finer, so that a string of uploads cannot read the text back from them."""
    return round(sum(values) / len(values), 2) if values else None


RATE_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _count_start(user):
    """JobLimitReached if ``user`` started LATENTRY_JOB_START_RATE's number of jobs within its
    period; else count this start. The counts live in the default cache, beside the API's
    other rate limits (CACHE_URL shares them between processes)."""
    rate = settings.LATENTRY_THROTTLE_RATES.get("job")
    if not rate:
        return
    allowed, period = rate.split("/")
    allowed, period = int(allowed), RATE_PERIODS[period[0]]
    key, now = f"job-starts:user-{user.pk}", time.time()
    starts = [t for t in cache.get(key, []) if t > now - period]
    if len(starts) >= allowed:
        oldest = starts[len(starts) - allowed] if allowed else now  # must pass out of the period
        wait = max(1, math.ceil(oldest + period - now))
        raise JobLimitReached(
            f"you started {allowed} jobs within {period} s, the most one user may "
            f"(LATENTRY_JOB_START_RATE {rate}): try again in {wait} s",
            retry_after=wait,
        )
    cache.set(key, [*starts, now], period)


def _int(value, default):
    """``value`` as an int, or ``default`` when it is not one."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def fair_order():
    """Queued jobs (both kinds) in the order the queue serves them: fair across users.

    A job's turn is (jobs its creator started since the oldest queued job was created, plus
    its place among its creator's queued jobs; then its age). So one user's pile of jobs
    alternates with everyone else's instead of going first, as round-robin between users
    would, and a user who just had a job started waits behind one who has not.
    """
    kinds = JOB_KINDS
    queued = sorted(
        (
            job
            for kind in kinds
            # Not the ones waiting for a retry after a storage outage: their message comes
            # back later, and nobody should wait for it meanwhile.
            for job in kind.objects.filter(
                status=Job.QUEUED, cancel_requested=False, attempts=0
            ).only("pk", "created_by", "created_at")
        ),
        key=lambda job: job.created_at,
    )
    if not queued:
        return []
    started = Counter(
        user
        for kind in kinds
        for user in kind.objects.filter(started_at__gte=queued[0].created_at).values_list(
            "created_by", flat=True
        )
    )
    turns = []
    for job in queued:
        turns.append((started[job.created_by_id], job.created_at, job))
        started[job.created_by_id] += 1
    return [job for *_, job in sorted(turns, key=lambda turn: turn[:2])]


def another_users_turn(job):
    """Whether a queued job of another user should run before ``job`` (see fair_order)."""
    order = fair_order()
    return bool(order) and order[0].created_by_id != job.created_by_id


def refresh_figures(**experts):
    """Refresh the catalog figure of the experts selected by ``experts`` (Expert filters): a
    domain that gains or loses a benchmark changes where their figures may come from."""
    for expert in Expert.objects.filter(**experts).only("pk"):
        expert.refresh_measured_gain()
