from django.urls import path
from rest_framework.routers import DefaultRouter

from . import views

app_name = "training_api"

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("datasets", views.DatasetViewSet, basename="dataset")
router.register("jobs/training", views.TrainingJobViewSet, basename="trainingjob")
router.register("jobs/evaluation", views.EvaluationJobViewSet, basename="evaluationjob")

urlpatterns = [
    *router.urls,
    path(
        "domains/<slug:slug>/leaderboard/",
        views.LeaderboardView.as_view(),
        name="leaderboard",
    ),
]
