"""Fair use of the router per caller: concurrent generations and tokens per minute.

A caller is a user, however they come (a session, or any of their API keys: more keys buy no
more room), else a client address (``registry.auth.caller``). Counters live in Django's cache,
so serving processes that share a cache (Redis in production) share them; a counter left by a
process that died expires with its timeout. Both limits answer 429 with
Retry-After (``Refused.wait``); 0 turns a limit off.
"""

import contextlib
import time

from django.conf import settings
from django.core.cache import cache
from rest_framework.exceptions import Throttled


class Refused(Throttled):
    default_code = "fair_use"


def acquire(who, prompt_tokens):
    """Take one of the caller's concurrent generations, after checking its token rate, and
    charge the prompt; ``release`` gives the generation back and charges what it generated."""
    tokens_limit = settings.LATENTRY_CALLER_TOKENS_PER_MIN
    if tokens_limit and (cache.get(_window_key(who)) or 0) >= tokens_limit:
        raise Refused(
            wait=60 - time.time() % 60,
            detail=f"over this caller's limit of {tokens_limit} tokens (prompt plus generated) "
            "a minute",
        )
    if limit := settings.LATENTRY_CALLER_CONCURRENCY:
        slots = _slots_key(who)
        # A process that dies holding slots leaves them until this runs out.
        cache.add(slots, 0, timeout=(settings.LATENTRY_REQUEST_TIMEOUT_S or 3600) + 60)
        if cache.incr(slots) > limit:
            cache.decr(slots)
            raise Refused(
                wait=1, detail=f"over this caller's limit of {limit} generations at a time"
            )
    _charge(who, prompt_tokens)


def release(who, generated_tokens):
    if settings.LATENTRY_CALLER_CONCURRENCY:
        with contextlib.suppress(ValueError):  # expired meanwhile
            cache.decr(_slots_key(who))
    _charge(who, generated_tokens)


def _charge(who, tokens):
    if settings.LATENTRY_CALLER_TOKENS_PER_MIN and tokens:
        window = _window_key(who)
        cache.add(window, 0, timeout=120)
        with contextlib.suppress(ValueError):
            cache.incr(window, tokens)


def _slots_key(who):
    return f"latentry:generating:{who}"


def _window_key(who):
    return f"latentry:tokens:{who}:{int(time.time() // 60)}"
