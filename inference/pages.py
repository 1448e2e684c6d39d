"""Pages of the router: "try it" on an expert's page (plain model beside the expert), and the
account's usage per API key."""

import dataclasses

from django import forms
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db.models import Max, Sum
from django.shortcuts import render
from django.views.decorators.http import require_POST

from registry import auth
from registry.api import GenerateThrottle
from registry.models import ApiKey
from registry.page_tools import expert_by_name, page_throttled

from . import remote, service
from .models import Usage


class TryForm(forms.Form):
    CHAT, TEXT = "chat", "text"
    prompt = forms.CharField(max_length=4000, widget=forms.Textarea(attrs={"rows": 4}))
    max_new_tokens = forms.IntegerField(min_value=1, max_value=256, initial=48)
    # A chat model given a question as raw text often ends its answer at once (SmolLM2 did,
    # on the README's own question): the prompt goes in as a chat message unless asked not to.
    send_as = forms.ChoiceField(
        choices=[(CHAT, "a chat message"), (TEXT, "raw text to continue")],
        required=False,
    )

    # Another expert (or several, joined by +) to compose with this one on the same request.
    compose_with = forms.CharField(max_length=400, required=False)

    def clean_send_as(self):
        return self.cleaned_data["send_as"] or self.CHAT


@require_POST
def try_expert(request, owner, name):
    """The same prompt through the plain base model and with the expert, greedy, side by side.

    The answer is a fragment for htmx to put under the form, or a page of its own without it.
    """
    expert = expert_by_name(request, owner, name)
    if refused := page_throttled(request, GenerateThrottle):
        return refused
    form = TryForm(request.POST)
    context = {"expert": expert, "form": form}
    status = 200
    if auth.anonymous_generation_refused(request):
        context["error"] = "Sign in to try experts on this server."
        status = 401
    elif form.is_valid():
        try:
            caller = auth.caller(request)  # the engine bounds its columns, as for the API
            context["answers"] = compare(expert, request.user, **form.cleaned_data, caller=caller)
        except (service.BadRequest, service.UnknownModel) as exc:
            context["error"] = str(exc)
            status = 400
        except (service.Overloaded, service.GenerationFailed) as exc:
            context["error"] = f"Try again in a moment: {exc}"
            status = 503
    else:
        status = 400
    template = "inference/_try_result.html" if request.htmx else "inference/try.html"
    return render(request, template, context, status=status)


def compare(
    expert, user, prompt, max_new_tokens, send_as=TryForm.CHAT, compose_with="", caller=None
):
    """The plain answer and the expert's (composed with ``compose_with``'s experts when it
    names any: ``owner/name[@version]``, several joined by ``+``), from this process's router
    or, when LATENTRY_SERVING_URL names one, from the serving process (on the user's behalf
    there). ``send_as`` chat: the prompt as the user's message, through the base model's chat
    template; text: as raw text to continue. The composition is checked where every request's
    is (``choose.composed``): a missing part or one that cannot compose is a BadRequest or
    UnknownModel, as through the API."""
    plain = service.Ask(base=expert.base_model.slug, max_new_tokens=max_new_tokens)
    if send_as == TryForm.TEXT:
        plain.prompt = prompt
    else:
        plain.messages = [{"role": "user", "content": prompt}]
    parts = [expert.full_name, compose_with] if compose_with else [expert.full_name]
    augmented = dataclasses.replace(plain, expert="+".join(parts))
    if settings.LATENTRY_SERVING_URL:
        return remote.run_together([plain, augmented], user)
    prepared = service.prepare(plain)
    return service.run_together([plain, augmented], user, prepared, caller=caller)


@login_required
def usage(request):
    keys = (
        ApiKey.objects.filter(user=request.user)
        .annotate(
            requests=Sum("usage__requests"),
            prompt_tokens=Sum("usage__prompt_tokens"),
            completion_tokens=Sum("usage__completion_tokens"),
            last_day=Max("usage__day"),
        )
        .order_by("-created_at")
    )
    days = Usage.objects.filter(api_key__user=request.user).select_related("api_key")[:60]
    return render(request, "inference/usage.html", {"keys": keys, "days": days})
