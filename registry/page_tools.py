"""What the HTML pages of every app share: the gate to an expert by name, htmx fragments, the
API's rate limits applied to a page's POST, and the site's 404.

The API has its own in ``api.py``; pages may use its throttles (the limits are one per
scope, whichever way a request comes), never the other way round.
"""

import functools

from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render

from .api import RateThrottle
from .models import Expert


def fragment_or_page(request, fragment, page):
    """htmx swaps in the fragment; a history restore (back after a reload) needs the whole
    page."""
    wants_fragment = request.htmx and not request.htmx.history_restore_request
    return fragment if wants_fragment else page


class AddressThrottle(RateThrottle):
    """A limit per client address, signed in or not."""

    def get_cache_key(self, request, view):
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class SignupThrottle(AddressThrottle):
    """Accounts made from one address (pages only: the API cannot sign up)."""

    scope = "signup"


class LoginThrottle(AddressThrottle):
    """Log-in attempts from one address: password guessing gets a few tries a minute."""

    scope = "login"


def page_throttled(request, throttle_class):
    """The API's rate limit for a page's POST: a 429 response naming the limit past it, else
    None."""
    throttle = throttle_class()
    if throttle.allow_request(request, None):
        return None
    wait = max(1, round(throttle.wait() or 1))
    response = HttpResponse(
        f"Too many requests: the limit is {throttle.rate}. Try again in {wait} s.",
        status=429,
        content_type="text/plain",
    )
    response["Retry-After"] = str(wait)
    return response


def throttle_posts(throttle_class):
    """Decorate a page view so that its POSTs count against ``throttle_class``'s rate."""

    def decorate(view):
        @functools.wraps(view)
        def throttled(request, *args, **kwargs):
            if request.method == "POST" and (refused := page_throttled(request, throttle_class)):
                return refused
            return view(request, *args, **kwargs)

        return throttled

    return decorate


def expert_by_name(request, owner, name):
    """The gate of every page about one expert: others' private experts are 404 here exactly
    as if they did not exist."""
    experts = Expert.objects.visible_to(request.user).named(f"{owner}/{name}")
    return get_object_or_404(experts.with_related())


def owned_expert(request, owner, name):
    """The expert, for a page that changes it: 404 to anyone but its owner."""
    expert = expert_by_name(request, owner, name)
    if expert.owner != request.user:
        raise Http404("only the owner may change this expert")
    return expert


def not_found(request, exception=None):
    """Django's 404 for a path no URL matches: JSON for API clients, a page for people."""
    if request.path.startswith(("/api/", "/v1/")):
        return JsonResponse({"detail": "not found"}, status=404)
    return render(request, "404.html", status=404)
