"""The router in another process: what a web process does when LATENTRY_SERVING_URL names the
serving service. It loads no model; "try it" asks the serving process over HTTP, on the
signed-in user's behalf (``registry.auth.OnBehalfAuthentication``), and gets the same Answers
as the in-process router gives."""

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings

from registry.auth import OnBehalfAuthentication

from . import service


def run_together(asks, user):
    """``service.run_together`` through the serving process: the asks go at once (the engine
    admits them together when it can)."""
    token = OnBehalfAuthentication.sign(user)
    with ThreadPoolExecutor(max_workers=len(asks)) as pool:
        return list(pool.map(lambda ask: _generate(ask, token), asks))


def _generate(ask, token):
    body = {
        "base": ask.base,
        "expert": ask.expert,
        "max_new_tokens": ask.max_new_tokens,
        "temperature": ask.temperature,
    }
    if ask.messages is not None:
        body["messages"] = ask.messages
    else:
        body["prompt"] = ask.prompt
    request = urllib.request.Request(
        f"{settings.LATENTRY_SERVING_URL.rstrip('/')}/api/v1/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Latentry-On-Behalf": token},
    )
    try:
        with urllib.request.urlopen(request, timeout=settings.LATENTRY_REQUEST_TIMEOUT_S + 30) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as exc:
        raise _refusal(exc) from None
    except OSError as exc:
        raise service.Overloaded(f"the serving service is unreachable: {exc}", 5) from None
    return service.Answer(
        text=answer["text"],
        token_ids=[],
        completion_tokens=answer["completion_tokens"],
        finish_reason=answer["finish_reason"],
        expert=answer["expert"],
        augmented=answer["augmented"],
        reason=answer["reason"],
        score=answer["score"],
        prompt_tokens=answer["prompt_tokens"],
        timings_ms=answer["timings_ms"],
    )


def _refusal(error):
    """The serving process's 4xx/5xx as the service's own exceptions."""
    try:
        detail = json.load(error).get("detail", error.reason)
    except ValueError:
        detail = error.reason
    if error.code == 404:
        return service.UnknownModel(detail)
    if error.code in (429, 503):
        return service.Overloaded(detail, int(error.headers.get("Retry-After") or 1))
    if error.code < 500:
        return service.BadRequest(detail)
    return service.GenerationFailed(detail)
