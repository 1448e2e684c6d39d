"""Which expert a request gets: named, ``auto``, or none.

Composed: ``a/x+b/y`` (each part named as below, up to ``LATENTRY_COMPOSE_MAX``): the
experts' static prefixes side by side (``coprocessor.compose``).
Named: ``owner/name``, ``owner/name@<number>`` or ``owner/name@<alias>`` (``latest``, the
newest ready version, by default), through the same visibility gate as everything else. The
name resolves to one version once, when the request starts: an alias moved meanwhile does not
change what a request in flight runs. A name that resolves to no ready version the caller may
use is an error (``UnknownModel``, 404), as a model a server does not have is for OpenAI's
clients: only a version that exists and fails at run time is dropped for the plain model.
``auto``: the mean-pooled last hidden state of the prompt's
own words under the base model, compared (cosine, both measured from the base model's centre
over plain text: ``coprocessor.routing``) with the routing profile of each expert the caller
may list; the best one above ``LATENTRY_AUTO_THRESHOLD`` wins, else none (with
``LATENTRY_AUTO_COMPOSE``: when each half of the prompt, read apart, best matches another
static prefix above it, those two, composed).
"""

import threading
import time
from dataclasses import dataclass

import torch
from django.conf import settings

from coprocessor import routing
from coprocessor.expert import PREFIX_KIND
from registry.models import LATEST, Expert, ExpertVersion, is_version_ref, split_full_name


class UnknownModel(LookupError):
    """No such model here (404): a base model this process does not serve, or a named expert
    that is missing, hidden from the caller, or has no ready version by that name."""


@dataclass
class Choice:
    version: ExpertVersion | None = None
    name: str | None = None  # owner/name@number of the chosen version ("+" between parts)
    score: float | None = None
    reason: str = ""  # why there is no expert (or why it was dropped)
    parts: tuple = ()  # a composition's parts, one Choice each (``version`` is then None)

    @property
    def chosen(self):
        """Whether there are experts to load: one version, or a composition's parts."""
        return self.version is not None or bool(self.parts)


def composed(spec, base_record, user):
    """Choice for ``a/x[@ref]+b/y[@ref]...``: each part as ``named`` (a missing or hidden one
    is UnknownModel), at most ``LATENTRY_COMPOSE_MAX`` of them, each expert once. ValueError
    for a spec that cannot name a composition."""
    specs = [part.strip() for part in spec.split("+")]
    limit = settings.LATENTRY_COMPOSE_MAX
    if len(specs) > limit:
        raise ValueError(f"a composition has at most {limit} experts, not {len(specs)}")
    if "auto" in specs:
        raise ValueError("auto chooses the experts itself: it cannot be part of a composition")
    names = [part.partition("@")[0] for part in specs]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"a composition names each expert once: {', '.join(twice)} twice")
    parts = tuple(named(part, base_record, user) for part in specs)
    return Choice(name="+".join(part.name for part in parts), parts=parts)


def well_formed(spec):
    """Whether ``spec`` reads ``owner/name`` or ``owner/name@<number or alias>``."""
    name, at, ref = spec.partition("@")
    return split_full_name(name) is not None and (not at or is_version_ref(ref))


def named(spec, base_record, user):
    """Choice for ``owner/name[@ref]``; UnknownModel, saying why, when it names no ready
    version the caller may use (a hidden expert reads as a missing one).

    One query finds the version; only when there is none do more say why."""
    if not well_formed(spec):
        raise ValueError(f"expert {spec!r} is not owner/name, owner/name@version or @alias")
    name, _, ref = spec.partition("@")
    experts = Expert.objects.visible_to(user).named(name).filter(base_model=base_record)
    versions = ExpertVersion.objects.light().filter(expert__in=experts)
    version = versions.at(ref).ready().first()
    if version is not None:
        return Choice(version=version, name=f"{name}@{version.number}")
    if not experts.exists():
        raise UnknownModel(_not_found(name, spec, base_record, user))
    if ref not in ("", LATEST):  # the newest, if rejected, is the one that was meant
        versions = versions.at(ref)
    rejected = versions.filter(status=ExpertVersion.REJECTED).order_by("-number").first()
    if rejected is not None:
        reason = rejected.status_reason
        raise UnknownModel(f"expert {name}@{rejected.number} was rejected: {reason}")
    raise UnknownModel(f"expert {spec} has no such ready version")


def _not_found(name, spec, base_record, user):
    """Why no expert ``name`` answers for ``base_record``: none the caller may see, or one
    trained on another base model (experts only run on the base model they were made for)."""
    other = Expert.objects.visible_to(user).named(name).select_related("base_model").first()
    if other is not None:
        return (
            f"expert {name} is trained on base model {other.base_model.slug}, not "
            f"{base_record.slug}: an expert runs only on its own base model"
        )
    return f"expert {spec} not found for {base_record.slug}"


class Profiles:
    """Routing profiles of the newest ready version of every expert, per base model, read
    from the database at most every ``LATENTRY_PROFILE_REFRESH_S``."""

    def __init__(self):
        self.cache = {}
        self.lock = threading.Lock()

    def for_base(self, base_record):
        now = time.monotonic()
        with self.lock:
            entry = self.cache.get(base_record.pk)
            if entry is None or now - entry[0] > settings.LATENTRY_PROFILE_REFRESH_S:
                entry = (now, *self._load(base_record))
                self.cache[base_record.pk] = entry
            return entry[1:]

    def _load(self, base_record):
        rows = []
        versions = (
            ExpertVersion.objects.ready()
            .defer("config")
            .filter(expert__base_model=base_record)
            .exclude(routing_profile=[])
            .select_related("expert__owner")
            .order_by("expert_id", "-number")
        )
        seen = set()
        for version in versions:
            if version.expert_id in seen:
                continue
            seen.add(version.expert_id)
            rows.append(version)
        if not rows:
            return [], None
        return rows, torch.tensor([v.routing_profile for v in rows], dtype=torch.float32)

    def clear(self):
        with self.lock:
            self.cache.clear()


profiles = Profiles()


# Each half of a prompt has at least this many tokens for auto to compose by halves.
MIN_HALF_TOKENS = 16


def auto(prompt_hidden, base_record, user, centre, halves=()):
    """Choice for ``auto`` from the prompt's mean hidden state (1-D tensor), measured from
    the base model's ``centre`` (``routing.centre``). ``halves`` (each half's mean hidden
    state, given where LATENTRY_AUTO_COMPOSE is on) may compose two experts
    (``_composed_by_halves``)."""
    rows, matrix = profiles.for_base(base_record)
    routable = routable_for(user, rows)
    allowed = [i for i, v in enumerate(rows) if v.pk in routable]
    if not allowed:
        return Choice(reason="auto: no expert with a routing profile for this base model")
    scores = routing.scores(prompt_hidden, matrix[allowed], centre)
    ranked = scores.argsort(descending=True).tolist()
    best = [_scored(rows[allowed[i]], float(scores[i])) for i in ranked[:2]]
    threshold = settings.LATENTRY_AUTO_THRESHOLD
    if best[0].score < threshold:
        return Choice(
            score=best[0].score,
            reason=f"auto: best match {best[0].name} scored {best[0].score:.3f}, under the "
            f"threshold {threshold}",
        )
    if halves:
        scored = [routing.scores(hidden, matrix[allowed], centre) for hidden in halves]
        if parts := _composed_by_halves(rows, allowed, scored, threshold):
            name = "+".join(part.name for part in parts)
            return Choice(name=name, score=best[0].score, parts=parts)
    return best[0]


def _composed_by_halves(rows, allowed, scored, threshold):
    """The experts each half of the prompt matches best, in the prompt's order, when the
    halves match different static prefixes, each at least ``threshold``; else None. Not the
    two best matches of the whole prompt: a prompt of one domain's text also matches its
    neighbour domains' experts well (bench/router.py: 97% of one domain's windows had a second
    expert above the threshold), while its halves match the same one."""
    parts = []
    for scores in scored:
        best = int(scores.argmax())
        if float(scores[best]) < threshold or rows[allowed[best]].kind != PREFIX_KIND:
            return None
        parts.append(_scored(rows[allowed[best]], float(scores[best])))
    return tuple(parts) if parts[0].version.pk != parts[1].version.pk else None


def _scored(version, score):
    return Choice(version=version, name=version.full_name, score=score)


def routable_for(user, versions):
    """The ids of ``versions`` that auto may pick for ``user`` now: still ready, of an expert
    listed for them (public ones and their own). One query: the cached profiles may be up to
    LATENTRY_PROFILE_REFRESH_S old, and visibility or status may have changed since."""
    if not versions:
        return set()
    allowed = ExpertVersion.objects.ready().filter(
        pk__in=[v.pk for v in versions], expert__in=Expert.objects.listed_for(user)
    )
    return set(allowed.values_list("pk", flat=True))
