"""Training from the browser: datasets, starting a job for an expert, watching it, cancelling.

A running job's page polls a fragment with htmx every couple of seconds (a plain page
refreshes itself instead) until the job ends and its evaluation is in.
"""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.cache import caches
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_POST

from registry import quotas, storage
from registry.api import UploadThrottle
from registry.charts import line_chart
from registry.models import BaseModel, Domain
from registry.page_tools import fragment_or_page, owned_expert, page_throttled

from . import datasets
from .forms import DatasetForm, TrainingForm
from .leaderboard import Leaderboard, domains_with_benchmarks
from .models import Dataset, EvaluationJob, JobLimitReached, TrainingJob

LEADERBOARD_PAGE_SIZE = 50


@login_required
def dataset_list(request):
    if refused := page_throttled(request, UploadThrottle):
        return refused
    form = DatasetForm(request.POST or None, request.FILES or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            dataset = create_dataset(request.user, form)
            if dataset is not None:
                messages.success(request, f"Dataset {dataset.full_name} is ready to train on.")
                return redirect("datasets")
        status = 503 if getattr(form, "storage_down", False) else 400
    mine = Dataset.objects.filter(owner=request.user).select_related("domain").order_by("name")
    return render(
        request, "training/datasets.html", {"form": form, "datasets": mine}, status=status
    )


def create_dataset(user, form):
    """The Dataset, or None with the problem put on the form."""
    data = dict(form.cleaned_data)
    upload, name = data.pop("file"), data.pop("name")
    try:
        return datasets.create_from_upload(user, name, upload, **data)
    except datasets.DatasetError as exc:
        form.add_error("file", str(exc))
    except datasets.NameTaken as exc:
        form.add_error("name", str(exc))
    except quotas.QuotaExceeded as exc:
        form.add_error("file", exc.message)
    except storage.StorageUnavailable:
        form.storage_down = True
        form.add_error("file", "storage is unavailable right now; nothing was saved, try again")
    return None


@login_required
def train(request, owner, name):
    expert = owned_expert(request, owner, name)
    form = TrainingForm(request.POST or None, expert=expert)
    status, retry_after = 200, None
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            job = TrainingJob.start(
                request.user, expert, data["datasets"], data["params"], data["visibility"]
            )
        except JobLimitReached as exc:  # too many jobs, or started too often
            form.add_error(None, str(exc))
            status, retry_after = 429, exc.retry_after
        except ValidationError as exc:  # the storage quota (QuotaExceeded), a rule of start
            form.add_error(None, exc)
        else:
            return redirect("job", job.pk)
    if form.errors and status == 200:
        status = 400
    context = {"form": form, "expert": expert}
    response = render(request, "training/train.html", context, status=status)
    if retry_after:
        response["Retry-After"] = str(retry_after)
    return response


@login_required
def job_list(request):
    training = TrainingJob.objects.filter(created_by=request.user).select_related("expert__owner")
    evaluations = EvaluationJob.objects.filter(created_by=request.user).select_related(
        "version__expert__owner"
    )
    context = {
        "training_jobs": training.order_by("-created_at")[:50],
        "evaluation_jobs": evaluations.order_by("-created_at")[:50],
    }
    return render(request, "training/jobs.html", context)


def own_job(request, pk):
    """A job of the user's (staff see all); anyone else's is 404."""
    jobs_seen = TrainingJob.objects.select_related("expert__owner", "base_model", "version")
    jobs_seen = jobs_seen.defer("version__routing_profile")  # polled every 2 s; never shown
    if not request.user.is_staff:
        jobs_seen = jobs_seen.filter(created_by=request.user)
    return get_object_or_404(jobs_seen, pk=pk)


@login_required
def job_detail(request, pk):
    job = own_job(request, pk)
    template = fragment_or_page(request, "training/_job_status.html", "training/job.html")
    response = render(request, template, job_context(job))
    patch_vary_headers(response, ["HX-Request"])
    return response


def job_context(job):
    version = job.published_version
    evaluation = (
        EvaluationJob.objects.filter(version=version, on_benchmarks=False)
        .order_by("-created_at")
        .first()
        if version
        else None
    )
    points = [(step, loss) for step, _, loss in job.history]
    return {
        "job": job,
        "queue": job.queue_position(),
        "version": version,
        "evaluation": evaluation,
        "evaluations": version.metrics.get("evaluations", []) if version else [],
        "loss_chart": line_chart({"training loss": points}, x_label="step", y_label="loss"),
        "validation_chart": validation_chart(job.validation),
        "harm_bound": settings.LATENTRY_HARM_BOUND_PCT,
        # Keep polling until the job and the evaluation it queued have both ended.
        "live": not job.finished or (evaluation is not None and not evaluation.finished),
    }


def validation_chart(checks):
    """A training job's checks: perplexity against the base model's, in percent, on the slice
    held out of its training text and on the reference text."""
    return line_chart(
        {
            "held-out slice": [(m["step"], -m["reduction_pct"]) for m in checks],
            "reference text": [(m["step"], m["harm_pct"]) for m in checks],
        },
        x_label="step",
        y_label="perplexity vs base, %",
    )


@login_required
@require_POST
def job_cancel(request, pk):
    job = own_job(request, pk)
    if job.cancel_by(request.user):
        messages.info(request, "Cancelling: the job stops at its next progress report.")
    return redirect("job", job.pk)


def leaderboards(request):
    """The domains that have benchmarks, each linking to its leaderboard."""
    return render(request, "training/leaderboards.html", {"domains": domains_with_benchmarks()})


def leaderboard(request, slug):
    """A domain's public experts ranked by their newest ready version's benchmark gain; all
    base models, or one (``?base_model=``).

    The table is the same for everyone (public experts only), so it is built once per
    LATENTRY_CATALOG_CACHE_SECONDS for each page, like the anonymous catalog."""
    domain = get_object_or_404(Domain, slug=slug)
    base = BaseModel.objects.filter(slug=request.GET.get("base_model", "")).first()
    number = request.GET.get("page", "")
    number = int(number) if number.isdigit() and len(number) < 7 else 1  # one key per page
    key = f"leaderboard:{domain.pk}:{base.pk if base else ''}:{number}"
    seconds = settings.LATENTRY_CATALOG_CACHE_SECONDS
    table = caches["pages"].get(key) if seconds else None
    if table is None:
        board = Leaderboard.of(domain, base)
        page = Paginator(board.versions, LEADERBOARD_PAGE_SIZE).get_page(number)
        table = render_to_string("training/_leaderboard_table.html", {"board": board, "page": page})
        if seconds:
            caches["pages"].set(key, table, seconds)
    return render(request, "training/leaderboard.html", {"domain": domain, "table": table})
