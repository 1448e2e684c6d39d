"""The operators' panel for datasets and jobs: watch progress, launch, cancel, retry, evaluate."""

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.http import HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from registry import storage
from registry.admin import ExpertVersionAdmin
from registry.charts import line_chart
from registry.models import ExpertVersion

from . import datasets
from .models import Benchmark, Dataset, EvaluationJob, Job, JobLimitReached, TrainingJob
from .pages import validation_chart
from .serializers import TrainingParamsSerializer


def admin_link(obj, text=None):
    if obj is None:
        return "—"
    meta = obj._meta
    url = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, text or obj)


def progress_bar(job):
    queue = job.queue_position()
    return format_html(
        '<progress max="100" value="{}" title="{}%"></progress> {}',
        f"{job.progress_pct:.0f}",
        f"{job.progress_pct:.0f}",
        queue["reason"] if queue else job.steps_summary(),
    )


def evaluation_table(evaluations):
    if not evaluations:
        return "—"
    rows = format_html_join(
        "",
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        (
            (
                e["dataset"],
                e["split"],
                e["pairs"],
                f"{e['ppl_base']:.3f}",
                f"{e['ppl_expert']:.3f}",
                f"{e['reduction_pct']:+.2f}%",
            )
            for e in evaluations
        ),
    )
    return format_html(
        "<table><tr><th>dataset</th><th>split</th><th>pairs</th><th>ppl base</th>"
        "<th>ppl expert</th><th>reduction</th></tr>{}</table>",
        rows,
    )


class DatasetAdminForm(forms.ModelForm):
    upload = forms.FileField(required=False, help_text="UTF-8 text, or .jsonl of {'text': ...}")

    class Meta:
        model = Dataset
        fields = ["owner", "name", "description", "domain", "public", "base_model"]

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("public") and hasattr(self.instance, "benchmark"):
            self.add_error("public", "this dataset is a domain benchmark: it stays private")
        upload = cleaned.get("upload")
        if self.instance.pk is None and upload is None:
            self.add_error("upload", "choose the dataset's file")
        elif upload is not None:
            try:
                sha256 = getattr(upload, "sha256", None) or storage.sha256_of(upload)
                self.described = datasets.describe_file(
                    upload,
                    sha256=sha256,
                    size=upload.size,
                    fmt=datasets.format_of(upload.name),
                    base_model=cleaned.get("base_model"),
                )
            except datasets.DatasetError as exc:
                self.add_error("upload", str(exc))
        return cleaned


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    form = DatasetAdminForm
    list_display = ["__str__", "domain", "format", "size", "documents", "token_count", "public"]
    list_filter = ["public", "format", "domain"]
    search_fields = ["name", "owner__username", "description", "sha256"]
    list_select_related = ["owner", "domain"]
    readonly_fields = ["format", "file_key", "sha256", "size", "documents", "token_count"]

    def save_model(self, request, obj, form, change):
        # The admin saves in a transaction: the file is stored under its key's lock.
        if described := getattr(form, "described", None):
            datasets.store(form.cleaned_data["upload"], described)
            for name, value in described.items():
                setattr(obj, name, value)
        super().save_model(request, obj, form, change)
        if described:
            datasets.count_later(obj)


class BenchmarkForm(forms.ModelForm):
    class Meta:
        model = Benchmark
        fields = ["domain", "dataset", "window", "ahead", "max_windows"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "dataset" in self.fields:  # staff's private datasets that are not benchmarks yet
            self.fields["dataset"].queryset = Dataset.objects.filter(
                owner__is_staff=True, public=False, benchmark__isnull=True
            )


@admin.register(Benchmark)
class BenchmarkAdmin(admin.ModelAdmin):
    """Staff attach a private dataset to a domain; every ready version is then measured on
    it (a maintenance task queues the evaluations). Its settings cannot change afterwards:
    every figure must come from the same pairs."""

    form = BenchmarkForm
    list_display = ["__str__", "domain", "window", "ahead", "max_windows", "measured", "created_at"]
    list_select_related = ["domain", "dataset__owner"]
    readonly_fields = ["added_by", "created_at"]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return self.readonly_fields
        return [*self.readonly_fields, "domain", "dataset", "window", "ahead", "max_windows"]

    @admin.display(description="versions measured")
    def measured(self, benchmark):
        return benchmark.results.count()

    def save_model(self, request, obj, form, change):
        if not change:
            obj.added_by = request.user
        super().save_model(request, obj, form, change)  # a new one is measured on commit


class JobAdmin(admin.ModelAdmin):
    list_filter = ["status", "device"]
    actions = ["cancel", "retry"]
    job_fields = [
        "status",
        "progress",
        "loss",
        "tokens_per_s",
        "eta_s",
        "cancel_requested",
        "worker",
        "device",
        "attempts",
        "error",
        "created_by",
        "created_at",
        "started_at",
        "heartbeat_at",
        "finished_at",
    ]

    def has_change_permission(self, request, obj=None):
        # A job's page is read-only: saving it would write over what its worker reports.
        return False

    @admin.display(description="progress")
    def progress(self, job):
        return progress_bar(job)

    @admin.display(description="eta")
    def eta(self, job):
        if job.eta_s is None or job.finished:
            return "—"
        minutes, seconds = divmod(int(job.eta_s), 60)
        return f"{minutes}m {seconds:02d}s"

    @admin.display(description="loss")
    def loss_value(self, job):
        return "—" if job.loss is None else f"{job.loss:.4f}"

    @admin.action(description="Cancel selected jobs")
    def cancel(self, request, queryset):
        cancelled = sum(job.cancel_by(request.user) for job in queryset)
        self.message_user(request, f"cancel requested for {cancelled} job(s)")

    @admin.action(description="Retry selected failed or cancelled jobs")
    def retry(self, request, queryset):
        retried = sum(job.retry() for job in queryset)
        level = messages.SUCCESS if retried else messages.WARNING
        self.message_user(request, f"{retried} job(s) queued again", level)


class TrainingJobForm(forms.ModelForm):
    params = forms.JSONField(
        initial=dict, required=False, help_text="hyper-parameters; defaults fill what is left out"
    )

    class Meta:
        model = TrainingJob
        fields = ["expert", "datasets", "params", "visibility"]

    def clean_datasets(self):
        TrainingJob.check_datasets(self.cleaned_data["datasets"])
        return self.cleaned_data["datasets"]

    def clean_params(self):
        checked = TrainingParamsSerializer(data=self.cleaned_data.get("params") or {})
        if not checked.is_valid():
            raise forms.ValidationError(f"{checked.errors}")
        params = dict(checked.validated_data)
        if expert := self.cleaned_data.get("expert"):
            TrainingJob.check_window(expert.base_model, TrainingJob.span(params))
        return params


@admin.register(TrainingJob)
class TrainingJobAdmin(JobAdmin):
    form = TrainingJobForm
    list_display = [
        "id",
        "expert",
        "status",
        "progress",
        "loss_value",
        "eta",
        "device",
        "created_by",
        "created_at",
    ]
    list_select_related = ["expert__owner", "created_by"]
    search_fields = ["expert__name", "expert__owner__username", "created_by__username"]
    autocomplete_fields = ["expert"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["expert", "datasets", "params", "visibility"]
        return ["expert", "base_model", "dataset_links", "version_link", "params"] + [
            "visibility",
            "loss_curve",
            "validation_curve",
            "outcome",
            "stopped",
            "kept_step",
            "within_harm_bound",
            "evaluations",
            "train_tokens",
            "checkpoint_step",
            "resumed_from_step",
            *self.job_fields,
        ]

    def get_readonly_fields(self, request, obj=None):
        return [] if obj is None else self.get_fields(request, obj)

    @admin.display(description="datasets")
    def dataset_links(self, job):
        return format_html_join(", ", "{}", ((admin_link(d),) for d in job.datasets.all()))

    @admin.display(description="version")
    def version_link(self, job):
        version = job.published_version
        return admin_link(version, f"version {version.number}" if version else None)

    @admin.display(description="loss curve")
    def loss_curve(self, job):
        points = [(step, loss) for step, _, loss in job.history]
        return line_chart({"training loss": points}, x_label="step", y_label="loss")

    @admin.display(description="checks")
    def validation_curve(self, job):
        return validation_chart(job.validation)

    @admin.display(description="evaluation")
    def evaluations(self, job):
        version = job.published_version
        return evaluation_table(version.metrics.get("evaluations", []) if version else [])

    def save_form(self, request, form, change):
        """Launch through TrainingJob.start, as the API and the pages do (a job's page is
        read-only: this runs only to add one)."""
        data = form.cleaned_data
        job = TrainingJob.start(
            request.user, data["expert"], data["datasets"], data["params"], data["visibility"]
        )
        self.message_user(request, f"{job} queued")
        return job

    def changeform_view(self, request, *args, **kwargs):
        """A start that TrainingJob.start refuses (the staff user's own limits on jobs, the
        owner's quota, a dataset they may not read) is a message on the form, not an error."""
        try:
            return super().changeform_view(request, *args, **kwargs)
        except (JobLimitReached, ValidationError) as exc:
            reason = "; ".join(exc.messages) if isinstance(exc, ValidationError) else exc
            self.message_user(request, f"not started: {reason}", messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())

    def save_model(self, request, obj, form, change):
        pass  # save_form saved it, datasets included

    def save_related(self, request, form, formsets, change):
        pass


@admin.register(EvaluationJob)
class EvaluationJobAdmin(JobAdmin):
    list_display = ["id", "version", "status", "progress", "device", "created_by", "created_at"]
    list_select_related = ["version__expert__owner", "created_by"]
    search_fields = ["version__expert__name", "version__expert__owner__username"]
    fields = ["version", "params", "results", *JobAdmin.job_fields]
    readonly_fields = fields

    def has_add_permission(self, request):
        return False  # launched from a version: "Evaluate selected versions"

    @admin.display(description="results")
    def results(self, job):
        return evaluation_table(job.result.get("evaluations", []))


admin.site.unregister(ExpertVersion)


@admin.register(ExpertVersion)
class TrainedExpertVersionAdmin(ExpertVersionAdmin):
    """Versions, with their lineage, their measurements, and an action that measures them."""

    actions = ["evaluate"]

    def get_readonly_fields(self, request, obj=None):
        return [*super().get_readonly_fields(request, obj), "lineage", "evaluations"]

    @admin.display(description="trained by")
    def lineage(self, version):
        return admin_link(version.training_job, None) if version.training_job_id else "upload"

    @admin.display(description="measured")
    def evaluations(self, version):
        return evaluation_table(version.metrics.get("evaluations", []))

    @admin.action(description="Evaluate selected versions (on their training data, or domain's)")
    def evaluate(self, request, queryset):
        started = []
        for version in queryset.select_related("expert", "training_job"):
            sources = evaluation_datasets(version)
            if not sources:
                self.message_user(
                    request, f"{version}: no dataset to evaluate on", messages.WARNING
                )
                continue
            try:
                started.append(EvaluationJob.start(request.user, version, sources))
            except JobLimitReached as exc:  # the staff user's own limits: the rest wait too
                self.message_user(
                    request, f"{version} and after: not queued: {exc}", messages.ERROR
                )
                break
        if started:
            self.message_user(request, f"queued {len(started)} evaluation job(s)")


def evaluation_datasets(version):
    """The held-out part of what it was trained on; else the domain's newest datasets (as many
    as one job may read)."""
    if version.training_job_id:
        return EvaluationJob.readable(version, version.training_job.datasets.all())
    readable = Dataset.objects.readable_by(version.expert.owner)
    newest = readable.filter(domain=version.expert.domain).order_by("-pk")
    return list(newest[: Job.MAX_DATASETS])
