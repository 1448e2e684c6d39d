from rest_framework.routers import DefaultRouter

from . import views

app_name = "webhooks_api"

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("webhooks", views.WebhookViewSet, basename="webhook")

urlpatterns = router.urls
