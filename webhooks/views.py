"""REST API of webhooks under /api/v1/webhooks/: each user sees and changes only their own."""

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response

from registry.api import AnnounceThrottle, ApiDefaults

from . import tasks
from .models import Webhook
from .serializers import DeliverySerializer, NewWebhookSerializer, WebhookSerializer


class WebhookViewSet(
    ApiDefaults,
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    """Your webhooks. The secret is in the creation response only; others' hooks are 404."""

    serializer_class = WebhookSerializer
    permission_classes = [IsAuthenticated]
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]
    lookup_value_regex = "[0-9]+"

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema generator has no user
            return Webhook.objects.none()
        return Webhook.objects.filter(owner=self.request.user)

    @extend_schema(responses={201: NewWebhookSerializer})
    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        hook = Webhook.create_for(
            request.user, data["url"], data["events"], active=data.get("active", True)
        )
        return Response(NewWebhookSerializer(hook).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses=DeliverySerializer(many=True))
    @action(detail=True, methods=["get"])
    def deliveries(self, request, pk=None):
        """The hook's deliveries, newest first."""
        hook = self.get_object()
        page = self.paginate_queryset(hook.deliveries.all())
        return self.get_paginated_response(DeliverySerializer(page, many=True).data)

    @extend_schema(request=None, responses={202: DeliverySerializer})
    @action(detail=True, methods=["post"], throttle_classes=[AnnounceThrottle])
    def test(self, request, pk=None):
        """Send the hook a "ping" delivery now; its outcome shows in the deliveries."""
        delivery = self.get_object().ping()
        tasks.queue([delivery] if delivery.status == delivery.PENDING else [])
        return Response(DeliverySerializer(delivery).data, status=status.HTTP_202_ACCEPTED)
