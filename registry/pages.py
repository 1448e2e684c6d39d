"""The pages of the registry: catalog, expert pages, publishing, publishers, account, API keys.

Server-rendered; htmx swaps parts of a page where it is present (``request.htmx``), and every
page also works as plain links and forms.
"""

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import F
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.cache import patch_vary_headers
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRedirect

from coprocessor.artifact import ArtifactError

from . import quotas, search, storage, uploads
from .api import AnnounceThrottle, UploadThrottle
from .charts import line_chart
from .filters import ExpertFilter
from .forms import AliasForm, ApiKeyForm, ExpertForm, ReviewForm, SignupForm, VersionUploadForm
from .models import ApiKey, BaseModel, Domain, Expert, ExpertVersion, NameTaken, VersionConflict
from .page_tools import (
    SignupThrottle,
    expert_by_name,
    fragment_or_page,
    owned_expert,
    page_throttled,
    throttle_posts,
)

CATALOG_PAGE_SIZE = 12
SORTS = {
    "downloads": [F("download_count").desc(), "-created_at"],
    "rating": [F("rating").desc(nulls_last=True), "-review_count"],
    "gain": [F("measured_gain").desc(nulls_last=True), "-created_at"],
    "newest": ["-created_at"],
}


def catalog(request):
    """Every listed expert, searched, filtered and sorted from the query string."""
    params = request.GET
    experts = ExpertFilter(params, queryset=Expert.objects.listed_for(request.user)).qs
    experts = experts.with_related()
    sort = params.get("sort") if params.get("sort") in SORTS else "downloads"
    order = search.best_first(experts, SORTS[sort])  # a search: best first, then the sort
    page = Paginator(experts.order_by(*order), CATALOG_PAGE_SIZE).get_page(params.get("page"))
    context = {
        "page": page,
        "params": params,
        "sort": sort,
        "sorts": list(SORTS),
        "domains": Domain.objects.all(),
        "base_models": BaseModel.objects.only("slug"),
        "kinds": ExpertVersion.KIND_CHOICES,
        "query_without_page": query_without(params, "page"),
    }
    response = render(
        request,
        fragment_or_page(request, "registry/_catalog_results.html", "registry/catalog.html"),
        context,
    )
    patch_vary_headers(response, ["HX-Request"])
    return response


def query_without(params, *names):
    query = params.copy()
    for name in names:
        query.pop(name, None)
    return query.urlencode()


def expert_detail(request, owner, name, review_form=None, alias_form=None):
    """The expert's card, measurements, every version (rejected ones with the reason), its
    aliases with their moves, and reviews."""
    expert = expert_by_name(request, owner, name)
    versions = expert.versions.light().order_by("-number")
    ready = [v for v in versions if v.status == ExpertVersion.READY]
    latest = ready[0] if ready else None
    reviews = expert.reviews.select_related("user").order_by("-updated_at")
    mine = request.user.is_authenticated and reviews.filter(user=request.user).first()
    can_review = expert.reviewable_by(request.user)
    is_owner = request.user == expert.owner
    context = {
        "expert": expert,
        "versions": versions,
        "latest": latest,
        "chart": perplexity_chart(latest),
        "aliases": expert.aliases.select_related("version"),
        "alias_moves": expert.alias_moves.select_related("moved_by")[:ALIAS_MOVES_SHOWN],
        "alias_form": alias_form or (AliasForm(versions=ready) if is_owner else None),
        "reviews": reviews,
        "review_form": review_form or (ReviewForm(instance=mine or None) if can_review else None),
        "is_owner": is_owner,
    }
    return render(request, "registry/expert_detail.html", context)


ALIAS_MOVES_SHOWN = 20


@login_required
@require_POST
def move_alias(request, owner, name):
    """Point one of the owner's aliases at a version, or remove it."""
    expert = owned_expert(request, owner, name)
    if refused := page_throttled(request, AnnounceThrottle):
        return refused
    form = AliasForm(request.POST, versions=expert.versions.ready().light())
    if form.is_valid():
        alias, number = form.cleaned_data["alias"], form.cleaned_data["version"]
        try:
            expert.move_alias(request.user, alias, number)
        except ValidationError as exc:
            form.add_error(None, exc)
    if not form.is_valid():
        response = expert_detail(request, owner, name, alias_form=form)
        response.status_code = 400
        return response
    where = f"v{number}" if number else "nowhere (removed)"
    messages.success(request, f"{expert.full_name}@{alias} now points to {where}.")
    return redirect(expert_url(expert) + "#aliases")


def perplexity_chart(version):
    """Per-position held-out perplexity, base vs expert, from the newest evaluation."""
    if version is None:
        return None
    evaluations = version.metrics.get("evaluations", [])
    measured = [e for e in evaluations if e.get("ppl_base_by_position")]
    if not measured:
        return None
    heldout = [e for e in measured if e.get("split") == "heldout"] or measured
    report = heldout[-1]
    return {
        "svg": line_chart(
            {
                "base model": list(enumerate(report["ppl_base_by_position"], start=1)),
                "with expert": list(enumerate(report["ppl_expert_by_position"], start=1)),
            },
            x_label="tokens ahead",
            y_label="perplexity",
        ),
        "report": report,
    }


@login_required
@require_POST
def review(request, owner, name):
    """Save the user's review (a second one edits the first); the owner's is refused (403)."""
    expert = expert_by_name(request, owner, name)
    expert.check_reviewer(request.user)  # before the form: the owner gets 403, not errors
    form = ReviewForm(request.POST)
    if not form.is_valid():
        response = expert_detail(request, owner, name, review_form=form)
        response.status_code = 400
        return response
    expert.save_review(request.user, **form.cleaned_data)
    messages.success(request, "Thank you: your review is saved.")
    return redirect(expert_url(expert) + "#reviews")


def expert_url(expert):
    return reverse("expert", args=[expert.owner.username, expert.name])


def publisher(request, owner):
    user = get_object_or_404(User, username=owner, is_active=True)
    experts = (
        Expert.objects.listed_for(request.user)
        .filter(owner=user)
        .with_related()
        .order_by(F("download_count").desc(), "name")
    )
    return render(request, "registry/publisher.html", {"publisher": user, "experts": experts})


@throttle_posts(SignupThrottle)
def signup(request):
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        messages.success(request, f"Welcome, {user.username}. Publish your first expert below.")
        return redirect("expert-new")
    return render(request, "registration/signup.html", {"form": form})


@login_required
def expert_new(request):
    form = ExpertForm(request.POST or None, owner=request.user)
    if request.method == "POST" and form.is_valid():
        try:
            expert = Expert.create_for(request.user, **form.cleaned_data)
        except NameTaken as exc:  # made by another request since the form's check
            form.add_error("name", exc)
        else:
            messages.success(request, "Expert created. Upload its first version, or train one.")
            return redirect("expert-upload", request.user.username, expert.name)
    return render(request, "registry/expert_form.html", {"form": form})


@login_required
def expert_edit(request, owner, name):
    expert = owned_expert(request, owner, name)
    form = ExpertForm(request.POST or None, instance=expert, owner=request.user)
    if request.method == "POST" and form.is_valid():
        form.save()
        messages.success(request, "Saved.")
        return redirect(expert_url(expert))
    return render(request, "registry/expert_form.html", {"form": form, "expert": expert})


@login_required
def expert_upload(request, owner, name):
    """Upload a version. Errors come back next to the field with status 400, so the page's
    script (drag and drop, progress) can show them in place."""
    expert = owned_expert(request, owner, name)
    if refused := page_throttled(request, UploadThrottle):
        return refused
    form = VersionUploadForm(request.POST or None, request.FILES or None)
    status = 200
    if request.method == "POST" and form.is_valid():
        upload = form.cleaned_data["file"]
        try:
            version = ExpertVersion.publish(
                expert,
                upload,
                sha256=uploads.sha256_of(upload),
                size=upload.size,
                changelog=form.cleaned_data["changelog"],
            )
        except (ArtifactError, VersionConflict) as exc:
            form.add_error("file", str(exc))
        except quotas.QuotaExceeded as exc:
            form.add_error("file", exc.message)
        except storage.StorageUnavailable:
            form.add_error("file", "storage is unavailable right now; nothing was saved, try again")
            status = 503
        else:
            messages.success(request, f"Version {version.number} is ready.")
            if request.htmx:  # the page's script sent it; it navigates there itself
                return HttpResponseClientRedirect(expert_url(expert))
            return redirect(expert_url(expert))
    if form.errors and status == 200:
        status = 413 if form.has_error("file", "too_large") else 400
    context = {"form": form, "expert": expert}
    return render(request, "registry/expert_upload.html", context, status=status)


@login_required
def account(request):
    """API keys (the secret shown once, on creation), and the user's experts."""
    form = ApiKeyForm(request.POST or None)
    created = None
    if request.method == "POST" and form.is_valid():
        try:
            key, plaintext = ApiKey.create_for(
                request.user, form.cleaned_data["name"], form.cleaned_data["scopes"]
            )
        except ValidationError as exc:  # one key too many
            form.add_error(None, exc)
        else:
            created = {"key": key, "plaintext": plaintext}
            form = ApiKeyForm()
    context = {
        "form": form,
        "created": created,
        "keys": ApiKey.objects.filter(user=request.user).order_by("-created_at"),
        "experts": Expert.objects.filter(owner=request.user).with_related().order_by("name"),
    }
    response = render(request, "registry/account.html", context, status=400 if form.errors else 200)
    response["Cache-Control"] = "no-store"  # a new key's secret must not be kept by caches
    return response


@login_required
@require_POST
def revoke_key(request, prefix):
    with transaction.atomic():
        key = get_object_or_404(ApiKey, user=request.user, prefix=prefix)
        key.revoke()
    messages.success(request, f"Key {key.name} ({key.prefix}) is revoked.")
    return redirect("account")
