from django.db import IntegrityError, models, transaction
from django.db.models import F
from django.utils import timezone

from registry.models import ApiKey


class Usage(models.Model):
    """Generation requests and tokens per API key and day, shown to the key's owner."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="usage")
    day = models.DateField()
    requests = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["api_key", "day"], name="one_usage_row_per_key_day")
        ]
        ordering = ["-day"]

    def __str__(self):
        return f"{self.api_key} on {self.day}: {self.requests} requests"

    @classmethod
    def record(cls, api_key, prompt_tokens, completion_tokens):
        """Add one request (atomic increments: concurrent requests all count)."""
        day = timezone.localdate()
        counts = dict(
            requests=F("requests") + 1,
            prompt_tokens=F("prompt_tokens") + prompt_tokens,
            completion_tokens=F("completion_tokens") + completion_tokens,
        )
        if cls.objects.filter(api_key=api_key, day=day).update(**counts):
            return
        try:
            with transaction.atomic():
                cls.objects.create(api_key=api_key, day=day)
        except IntegrityError:
            pass  # another request created today's row first
        cls.objects.filter(api_key=api_key, day=day).update(**counts)
