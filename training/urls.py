from django.urls import path
from rest_framework.routers import DefaultRouter

from . import views

app_name = "training_api"

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("jobs/training", views.TrainingJobViewSet, basename="trainingjob")
router.register("jobs/evaluation", views.EvaluationJobViewSet, basename="evaluationjob")

dataset_list = views.DatasetViewSet.as_view({"get": "list", "post": "create"})
dataset_detail = views.DatasetViewSet.as_view({"get": "retrieve", "delete": "destroy"})

urlpatterns = [
    *router.urls,
    path("datasets/", dataset_list, name="dataset-list"),
    path("datasets/<str:owner>/<str:name>/", dataset_detail, name="dataset-detail"),
    path(
        "experts/<str:owner>/<str:name>/pairings/",
        views.PairingView.as_view(),
        name="pairings",
    ),
    path(
        "domains/<slug:slug>/leaderboard/",
        views.LeaderboardView.as_view(),
        name="leaderboard",
    ),
]
