from django.urls import include, path
from rest_framework.routers import DefaultRouter

from . import views

app_name = "api"

router = DefaultRouter()
router.register("base-models", views.BaseModelViewSet, basename="basemodel")
router.register("domains", views.DomainViewSet, basename="domain")
router.register("api-keys", views.ApiKeyViewSet, basename="apikey")

expert_list = views.ExpertViewSet.as_view({"get": "list", "post": "create"})
expert_detail = views.ExpertViewSet.as_view(
    {"get": "retrieve", "put": "update", "patch": "partial_update", "delete": "destroy"}
)
version_list = views.ExpertVersionViewSet.as_view({"get": "list", "post": "create"})
version_detail = views.ExpertVersionViewSet.as_view({"get": "retrieve"})
version_download = views.ExpertVersionViewSet.as_view({"get": "download"})
alias_list = views.AliasViewSet.as_view({"get": "list"})
alias_detail = views.AliasViewSet.as_view({"get": "retrieve", "put": "update", "delete": "destroy"})
alias_moves = views.AliasMoveViewSet.as_view({"get": "list"})
review_list = views.ReviewViewSet.as_view({"get": "list", "post": "create"})
review_detail = views.ReviewViewSet.as_view(
    {"get": "retrieve", "patch": "partial_update", "delete": "destroy"}
)

expert = "experts/<str:owner>/<str:name>/"
urlpatterns = [
    path("", include(router.urls)),
    path("health/", views.HealthView.as_view(), name="health"),
    path("experts/", expert_list, name="expert-list"),
    path(expert, expert_detail, name="expert-detail"),
    path(expert + "versions/", version_list, name="version-list"),
    # <ref>: a version number, an alias or "latest"
    path(expert + "versions/<str:ref>/", version_detail, name="version-detail"),
    path(expert + "versions/<str:ref>/download/", version_download, name="version-download"),
    path(expert + "aliases/", alias_list, name="alias-list"),
    path(expert + "aliases/<str:alias>/", alias_detail, name="alias-detail"),
    path(expert + "alias-moves/", alias_moves, name="alias-moves"),
    path(expert + "reviews/", review_list, name="review-list"),
    path(expert + "reviews/<int:pk>/", review_detail, name="review-detail"),
]
