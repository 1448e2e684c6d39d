"""The delivery task: one attempt per message (``Delivery.attempt``), the next one sent back
to the queue after a backoff. The row holds the delivery's state; the message only its id."""

import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction

from .models import Delivery

logger = logging.getLogger(__name__)

# An attempt waits the timeout to connect and again to read, perhaps for a second address; a
# receiver that answers a byte at a time is cut off here.
ATTEMPT_LIMIT_S = 4 * settings.LATENTRY_WEBHOOK_TIMEOUT_S + 10


@shared_task(
    name="webhooks.deliver",
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
        again = delivery.record(error=f"the attempt took longer than {ATTEMPT_LIMIT_S:g} s")
    except Exception as exc:
        logger.exception("webhook delivery %s failed", delivery_id)
        again = delivery.record(error=f"internal error: {type(exc).__name__}")
    if again:
        queue = settings.LATENTRY_MAINTENANCE_QUEUE
        raise self.retry(countdown=delivery.backoff_s(), queue=queue)


def queue(deliveries):
    """Send each delivery's first attempt once the transaction commits. One that cannot be
    queued (the broker is down) is recorded as failed, not left pending for ever."""

    def send():
        for delivery in deliveries:
            try:
                deliver.apply_async((delivery.pk,), queue=settings.LATENTRY_MAINTENANCE_QUEUE)
            except Exception as exc:
                logger.exception("could not queue webhook delivery %s", delivery.pk)
                delivery.record(error=f"could not be queued: {exc}", final=True)

    if deliveries:
        transaction.on_commit(send)
