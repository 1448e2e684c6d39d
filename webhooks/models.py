"""Webhooks: URLs a user registers for events of their own experts and jobs, and the record of
every delivery to them.

A delivery's row is the truth about it; the Celery message (``tasks.deliver``) carries only its
id. Each attempt is claimed with a conditional update, signed afresh (``signing``) and sent
through ``outbound``, which refuses addresses the operator has not allowed. A hook whose
attempts keep failing is switched off (``Webhook.count_attempt``) until its owner switches it
back on.
"""

import json
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models import F
from django.utils import timezone

from registry import events

from . import outbound, signing

PING = "ping"  # the event of a test delivery the owner asks for


def validate_url(url):
    try:
        outbound.check_url(url)
    except outbound.Refused as exc:
        raise ValidationError(str(exc)) from None


def validate_events(value):
    if not isinstance(value, list) or not value:
        raise ValidationError("name at least one event")
    unknown = [name for name in value if name not in events.EVENTS]
    if unknown:
        names, known = ", ".join(map(str, unknown)), ", ".join(events.EVENTS)
        raise ValidationError(f"unknown events: {names}; choose from {known}")


class Webhook(models.Model):
    """A URL that hears of ``events`` for its owner's experts and jobs. The secret signs every
    delivery; it is stored as it is (signing needs it) and shown to the owner once."""

    SECRET_PREFIX = "whsec_"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="webhooks"
    )
    url = models.URLField(max_length=500, validators=[validate_url])
    events = models.JSONField(default=list, validators=[validate_events])
    secret = models.CharField(max_length=100, editable=False)
    active = models.BooleanField(default=True)
    # Failed attempts since the last that succeeded; at LATENTRY_WEBHOOK_MAX_FAILURES the hook is
    # switched off, and disabled_reason says why until the owner switches it back on.
    consecutive_failures = models.PositiveIntegerField(default=0, editable=False)
    disabled_reason = models.CharField(max_length=600, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self):
        return f"{self.owner} → {self.url}"

    def save(self, *args, **kwargs):
        self.events = sorted(set(self.events))  # however it came in: API, page, admin
        if self.active and self.pk and Webhook.objects.filter(pk=self.pk, active=False).exists():
            # Switched back on (API, page, admin): its failures are forgiven.
            self.consecutive_failures, self.disabled_reason = 0, ""
        super().save(*args, **kwargs)

    @classmethod
    def create_for(cls, user, url, events, active=True):
        """A new hook, with a new secret; ValidationError for a bad URL or events, or past the
        owner's cap (LATENTRY_MAX_WEBHOOKS, checked with the owner's row locked so that
        concurrent requests cannot both slip under)."""
        hook = cls(owner=user, url=url, events=list(events), active=active, secret=cls.new_secret())
        hook.full_clean(exclude=["owner"])
        with transaction.atomic():
            get_user_model().objects.select_for_update(no_key=True).filter(pk=user.pk).first()
            limit = settings.LATENTRY_MAX_WEBHOOKS
            if limit and cls.objects.filter(owner=user).count() >= limit:
                raise ValidationError(
                    f"you have {limit} webhooks, the most one user may have "
                    "(LATENTRY_MAX_WEBHOOKS): delete one first"
                )
            hook.save()
        return hook

    @classmethod
    def new_secret(cls):
        return f"{cls.SECRET_PREFIX}{secrets.token_urlsafe(32)}"

    def ping(self):
        """A test delivery, sent whatever events the hook is for."""
        return Delivery.objects.make(self, PING, {"webhook": self.pk})

    def count_attempt(self, error=""):
        """Count an attempt the receiver answered (no ``error``: 2xx) or failed. The
        LATENTRY_WEBHOOK_MAX_FAILURES-th failure in a row switches the hook off, saying why:
        a receiver that is gone or slow must not take the webhook worker's time for ever."""
        hooks = Webhook.objects.filter(pk=self.pk)
        if not error:
            hooks.exclude(consecutive_failures=0).update(consecutive_failures=0)
            self.consecutive_failures = 0
            return
        hooks.update(consecutive_failures=F("consecutive_failures") + 1)
        limit = settings.LATENTRY_WEBHOOK_MAX_FAILURES
        if limit:
            reason = f"switched off after {limit} failed attempts in a row; the last: {error}"
            reason = reason[: Webhook._meta.get_field("disabled_reason").max_length]
            # Only the update that crosses the limit writes its reason.
            hooks.filter(active=True, consecutive_failures__gte=limit).update(
                active=False, disabled_reason=reason
            )
        self.refresh_from_db(fields=["active", "consecutive_failures", "disabled_reason"])


class DeliveryQuerySet(models.QuerySet):
    def announce(self, user_id, event, payload):
        """A delivery to each of the user's active hooks for ``event`` (``make``); the pending
        ones, which are to be sent. JSON containment is not on every database (SQLite), and a
        user has at most a handful of hooks: the events are checked here."""
        hooks = Webhook.objects.filter(owner_id=user_id, active=True)
        made = [self.make(hook, event, payload) for hook in hooks if event in hook.events]
        return [delivery for delivery in made if delivery.status == Delivery.PENDING]

    def make(self, hook, event, payload):
        """A pending delivery, the hook's older finished ones pruned; a failed one, recorded but
        never sent, when the hook's owner already has LATENTRY_WEBHOOK_MAX_PENDING waiting
        across all their hooks (receivers that never answer must not let one user fill the
        webhooks queue). Counted with the owner's row locked, so that concurrent events cannot
        slip under together."""
        limit = settings.LATENTRY_WEBHOOK_MAX_PENDING
        fields = {"webhook": hook, "event": event, "payload": payload}
        with transaction.atomic():
            if limit:
                owner = get_user_model().objects.select_for_update(no_key=True)
                owner.filter(pk=hook.owner_id).first()
                pending = self.filter(webhook__owner_id=hook.owner_id, status=Delivery.PENDING)
                if pending.count() >= limit:
                    error = (
                        f"not sent: you have {limit} deliveries still pending, the most one "
                        "user may have (LATENTRY_WEBHOOK_MAX_PENDING)"
                    )
                    fields.update(status=Delivery.FAILED, error=error)
            delivery = self.create(**fields)
        self.prune(hook)
        return delivery

    def prune(self, hook, keep=None):
        """Drop ``hook``'s finished deliveries beyond the newest ``keep``
        (LATENTRY_WEBHOOK_KEEP_DELIVERIES); pending ones are never dropped."""
        keep = settings.LATENTRY_WEBHOOK_KEEP_DELIVERIES if keep is None else keep
        newest = self.filter(webhook=hook).order_by("-pk").values_list("pk", flat=True)
        boundary = list(newest[keep : keep + 1])
        if boundary:
            self.filter(webhook=hook, pk__lte=boundary[0]).exclude(status=Delivery.PENDING).delete()


class Delivery(models.Model):
    """One event sent to one hook, tried up to MAX_ATTEMPTS times.

    pending -> succeeded: an attempt answered 2xx.
    pending -> failed: the last attempt did not, or the address was refused (at once), or the
    hook was switched off meanwhile.
    """

    PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"
    STATUS_CHOICES = [(PENDING, "pending"), (SUCCEEDED, "succeeded"), (FAILED, "failed")]
    MAX_ATTEMPTS = 5
    MAX_ERROR_CHARS = 500

    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=40)
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=10, choices=STATUS_CHOICES, default=PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.CharField(max_length=MAX_ERROR_CHARS, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    objects = DeliveryQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-pk"]
        verbose_name_plural = "deliveries"

    def __str__(self):
        return f"{self.event} to {self.webhook.url} ({self.status})"

    def body(self):
        """The JSON sent: the same bytes at every attempt (the signature's time changes). Its
        ``id``, the delivery's, is what receivers deduplicate on: the signature covers it (the
        ``Latentry-Delivery`` header repeats it, unsigned)."""
        document = {
            "id": self.pk,
            "event": self.event,
            "created_at": self.created_at.isoformat(),
            "data": self.payload,
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

    def headers(self, body, timestamp=None):
        return {
            "Content-Type": "application/json",
            "User-Agent": "Latentry-Webhooks/1",
            "Latentry-Event": self.event,
            "Latentry-Delivery": str(self.pk),
            signing.HEADER: signing.signature_header(self.webhook.secret, body, timestamp),
        }

    def attempt(self):
        """Make the next attempt and record its outcome; True when another should follow.

        1. Claim it: a conditional update of ``attempts``, so that a second message for the
           same attempt (a re-delivery) finds it taken and does nothing.
        2. Sign the body now and POST it (``send``), and count the outcome on the hook.
        3. Record: 2xx succeeded; a refused address failed at once; anything else pending for
           another attempt, or failed after the last one.
        """
        if self.status != self.PENDING:
            return False
        claimed = Delivery.objects.filter(
            pk=self.pk, status=self.PENDING, attempts=self.attempts
        ).update(attempts=F("attempts") + 1)
        if not claimed:
            return False  # another worker took this attempt, or the delivery ended
        self.attempts += 1
        hook = self.webhook
        if not hook.active:
            return self.record(error="the webhook was switched off", final=True)
        if self.attempts > self.MAX_ATTEMPTS:  # a re-delivery after the last attempt was lost
            return self.record(error="no attempts left", final=True)
        response_status, error, final = self.send()
        hook.count_attempt(error)
        return self.record(response_status, error, final)

    def send(self):
        """POST the body, signed now, within LATENTRY_WEBHOOK_DEADLINE_S: the answer's HTTP
        status, the error ("" for a 2xx answer), and whether the error is final."""
        body = self.body()
        try:
            status, start = outbound.send(
                self.webhook.url, body, self.headers(body), settings.LATENTRY_WEBHOOK_DEADLINE_S
            )
        except outbound.Refused as exc:
            return None, f"refused: {exc}", True
        except outbound.Unreachable as exc:
            return None, str(exc), False
        if 200 <= status < 300:
            return status, "", False
        answer = f"HTTP {status}: {start.strip()}" if start.strip() else f"HTTP {status}"
        return status, answer, False

    def record(self, response_status=None, error="", final=False):
        """Write this attempt's outcome (no error and a status: succeeded); True when another
        attempt should follow."""
        if not error and response_status is not None:
            status = self.SUCCEEDED
        elif final or self.attempts >= self.MAX_ATTEMPTS:
            status = self.FAILED
        else:
            status = self.PENDING
        self.status, self.response_status = status, response_status
        self.error = error[: self.MAX_ERROR_CHARS]
        self.delivered_at = timezone.now() if status == self.SUCCEEDED else None
        Delivery.objects.filter(pk=self.pk).update(
            status=self.status,
            response_status=self.response_status,
            error=self.error,
            delivered_at=self.delivered_at,
        )
        return status == self.PENDING

    def backoff_s(self):
        """The wait before the next attempt: doubling from LATENTRY_WEBHOOK_RETRY_BASE_S."""
        return 2 ** max(0, self.attempts - 1) * settings.LATENTRY_WEBHOOK_RETRY_BASE_S
