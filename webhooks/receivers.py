"""What happened (``registry.events``) becomes deliveries: one to each of the user's active
hooks that asked for the event, each sent by a worker."""

from django.dispatch import receiver

from registry import events

from . import tasks
from .models import Delivery


@receiver(events.happened, dispatch_uid="webhooks.announce")
def announce(sender, user_id, event, payload, **kwargs):
    tasks.queue(Delivery.objects.announce(user_id, event, payload))
