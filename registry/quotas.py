"""What one user may keep stored: the one place that counts a user's bytes.

A user's stored bytes are the sizes of their experts' versions and of their datasets, a file
counting once per row that names it (content addressing may share the object; the quota is about
what each user asked to keep). Callers check early without a lock (nothing read or stored yet),
then again just before creating the row, with the user's row locked until the commit, so
concurrent uploads by one user cannot both slip under.
"""

from django.apps import apps
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db.models import Sum


class QuotaExceeded(ValidationError):
    """Storing this would take the user past LATENTRY_MAX_STORED_BYTES (a 400 in the API)."""

    def __str__(self):  # the message itself where a job records its error
        return self.message


def stored_bytes(user):
    """Bytes of ``user``'s versions and datasets."""
    versions = apps.get_model("registry", "ExpertVersion").objects.filter(expert__owner=user)
    datasets = apps.get_model("training", "Dataset").objects.filter(owner=user)
    return sum(rows.aggregate(total=Sum("size"))["total"] or 0 for rows in (versions, datasets))


def lock_user(user):
    """Lock ``user``'s row until the transaction commits (``FOR NO KEY UPDATE``, which leaves
    rows that point at the user free to be written meanwhile): checks of one user's limits
    then take turns, so two concurrent requests cannot both slip under one."""
    get_user_model().objects.select_for_update(no_key=True).filter(pk=user.pk).first()


def check_room(user, size, lock=True):
    """Raise QuotaExceeded unless ``size`` more bytes fit ``user``'s quota. With ``lock``, call
    it just before the row is created, in that transaction: it locks the user's row until the
    commit (``lock_user``). Without, it is a cheap early refusal before any work."""
    limit = settings.LATENTRY_MAX_STORED_BYTES
    if not limit:
        return
    if lock:
        lock_user(user)
    used = stored_bytes(user)
    if used + size > limit:
        raise QuotaExceeded(
            f"storing {size} bytes would bring {user.username}'s stored bytes to {used + size}, "
            f"over the quota of {limit} (LATENTRY_MAX_STORED_BYTES); delete versions or "
            "datasets to make room"
        )
