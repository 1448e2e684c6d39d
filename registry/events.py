"""What happened to a user's experts and jobs, for whoever listens (the webhooks app).

Apps announce with ``emit``; listeners connect to ``happened``. The signal is sent once the
surrounding transaction commits, so no listener hears of a change that was rolled back, and
the apps that emit never import the ones that listen.
"""

from django.db import transaction
from django.dispatch import Signal

JOB_SUCCEEDED = "job.succeeded"
JOB_FAILED = "job.failed"
JOB_CANCELLED = "job.cancelled"
VERSION_PUBLISHED = "version.published"
EVALUATION_RECORDED = "evaluation.recorded"
ALIAS_MOVED = "alias.moved"
EVENTS = (
    JOB_SUCCEEDED,
    JOB_FAILED,
    JOB_CANCELLED,
    VERSION_PUBLISHED,
    EVALUATION_RECORDED,
    ALIAS_MOVED,
)

# Sent with user_id (whose expert or job it is), event (one of EVENTS) and payload (a dict
# that can be sent as JSON).
happened = Signal()


def emit(user_id, event, payload):
    """Announce ``event`` to ``user_id``'s listeners once the current transaction commits."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}")

    def send():
        happened.send(sender=None, user_id=user_id, event=event, payload=payload)

    transaction.on_commit(send, robust=True)
