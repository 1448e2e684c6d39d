from django.contrib import admin

from .models import Delivery, Webhook


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    """Owners make hooks (they see the secret once); staff may read, switch off and delete."""

    list_display = ["id", "owner", "url", "events", "active", "consecutive_failures", "created_at"]
    list_filter = ["active"]
    search_fields = ["url", "owner__username"]
    list_select_related = ["owner"]
    fields = [
        "owner",
        "url",
        "events",
        "active",
        "consecutive_failures",
        "disabled_reason",
        "created_at",
    ]
    readonly_fields = [name for name in fields if name != "active"]  # staff switch hooks on/off

    def has_add_permission(self, request):
        return False


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "webhook",
        "event",
        "status",
        "attempts",
        "response_status",
        "created_at",
        "delivered_at",
    ]
    list_filter = ["status", "event"]
    search_fields = ["webhook__url", "webhook__owner__username"]
    list_select_related = ["webhook__owner"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
