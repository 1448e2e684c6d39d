"""The owner's webhooks page: hooks and their recent deliveries; add one (its secret shown
once), switch one back on, delete one."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from .forms import WebhookForm
from .models import Delivery, Webhook

RECENT_DELIVERIES = 20


@login_required
def webhook_list(request):
    form = WebhookForm(request.POST or None)
    created = None
    if request.method == "POST" and form.is_valid():
        try:
            created = Webhook.create_for(
                request.user, form.cleaned_data["url"], form.cleaned_data["events"]
            )
        except ValidationError as exc:
            form.add_error(None, exc)
        else:
            form = WebhookForm()
    deliveries = Delivery.objects.filter(webhook__owner=request.user).select_related("webhook")
    context = {
        "form": form,
        "created": created,
        "hooks": Webhook.objects.filter(owner=request.user),
        "deliveries": deliveries[:RECENT_DELIVERIES],
    }
    status = 400 if form.errors else 200
    response = render(request, "webhooks/webhooks.html", context, status=status)
    response["Cache-Control"] = "no-store"  # a new hook's secret must not be kept by caches
    return response


@login_required
@require_POST
def webhook_delete(request, pk):
    hook = get_object_or_404(Webhook, pk=pk, owner=request.user)
    hook.delete()
    messages.success(request, f"The webhook to {hook.url} is deleted.")
    return redirect("webhooks")


@login_required
@require_POST
def webhook_switch_on(request, pk):
    """Switch a hook back on (after the service switched it off, or its owner did)."""
    hook = get_object_or_404(Webhook, pk=pk, owner=request.user)
    hook.active = True
    hook.save()
    messages.success(request, f"The webhook to {hook.url} is on again.")
    return redirect("webhooks")
