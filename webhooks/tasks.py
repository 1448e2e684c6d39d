"""The delivery task: one attempt per message (``Delivery.attempt``), the next one sent back
to the queue after a backoff. The row holds the delivery's state; the message only its id."""

import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction

from .models import Delivery

logger = logging.getLogger(__name__)

# An attempt ends by its deadline once connecting starts; name resolution, which no socket
# timeout bounds, comes before. This backstop is for that.
ATTEMPT_LIMIT_S = settings.LATENTRY_WEBHOOK_DEADLINE_S + 20


@shared_task(
    name="webhooks.deliver",  # routed to LATENTRY_WEBHOOK_QUEUE (CELERY_TASK_ROUTES)
    bind=True,
    ignore_result=True,
    acks_late=True,
    max_retries=Delivery.MAX_ATTEMPTS,
    soft_time_limit=ATTEMPT_LIMIT_S,
    time_limit=ATTEMPT_LIMIT_S + 30,
)
def deliver(self, delivery_id):
    """One attempt at a delivery; another after a backoff while one may still succeed."""
    delivery = Delivery.objects.select_related("webhook").filter(pk=delivery_id).first()
    if delivery is None:
        return  # its hook was deleted, or the delivery pruned
    try:
        again = delivery.attempt()
    except SoftTimeLimitExceeded:
        error = f"the attempt took longer than {ATTEMPT_LIMIT_S:g} s"
        delivery.webhook.count_attempt(error)
        again = delivery.record(error=error)
    except Exception as exc:
        logger.exception("webhook delivery %s failed", delivery_id)
        again = delivery.record(error=f"internal error: {type(exc).__name__}")
    if again:
        raise self.retry(countdown=delivery.backoff_s())  # routed as the first attempt was


def queue(deliveries):
    """Send each delivery's first attempt once the transaction commits. One that cannot be
    queued (the broker is down) is recorded as failed, not left pending for ever."""

    def send():
        for delivery in deliveries:
            try:
                deliver.apply_async((delivery.pk,))
            except Exception as exc:
                logger.exception("could not queue webhook delivery %s", delivery.pk)
                delivery.record(error=f"could not be queued: {exc}", final=True)

    if deliveries:
        transaction.on_commit(send)
