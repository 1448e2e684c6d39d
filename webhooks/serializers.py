from rest_framework import serializers

from registry import events
from registry.api import StrictModelSerializer

from .models import Delivery, Webhook, validate_url


class WebhookSerializer(StrictModelSerializer):
    url = serializers.URLField(
        max_length=500,
        validators=[validate_url],
        help_text="http(s) URL that receives a signed POST for each event",
    )
    events = serializers.ListField(
        child=serializers.ChoiceField(choices=events.EVENTS),
        min_length=1,
        max_length=len(events.EVENTS),
        help_text="the events to hear of",
    )

    active = serializers.BooleanField(
        required=False,
        help_text="off: no deliveries; true switches a hook that was switched off back on",
    )
    consecutive_failures = serializers.IntegerField(
        read_only=True,
        help_text="failed attempts since the last that succeeded; at the operator's limit "
        "(LATENTRY_WEBHOOK_MAX_FAILURES) the hook is switched off",
    )
    disabled_reason = serializers.CharField(
        read_only=True, help_text="why the service switched the hook off; empty otherwise"
    )

    class Meta:
        model = Webhook
        fields = [
            "id",
            "url",
            "events",
            "active",
            "consecutive_failures",
            "disabled_reason",
            "created_at",
        ]
        read_only_fields = ["created_at"]


class NewWebhookSerializer(WebhookSerializer):
    """A hook as its creation answers it: with the secret, which is never shown again."""

    secret = serializers.CharField(
        read_only=True, help_text="signs every delivery (Latentry-Signature); shown only now"
    )

    class Meta(WebhookSerializer.Meta):
        fields = [*WebhookSerializer.Meta.fields, "secret"]


class DeliverySerializer(serializers.ModelSerializer):
    class Meta:
        model = Delivery
        fields = [
            "id",
            "event",
            "payload",
            "status",
            "attempts",
            "response_status",
            "error",
            "created_at",
            "delivered_at",
        ]
        read_only_fields = fields
