from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from inference import pages as inference_pages
from registry import pages as registry_pages
from registry.page_tools import LoginThrottle, not_found, throttle_posts
from training import pages as training_pages
from webhooks import pages as webhooks_pages

expert = "experts/<str:owner>/<str:name>/"

pages = [
    path("", registry_pages.catalog, name="catalog"),
    path("experts/new/", registry_pages.expert_new, name="expert-new"),
    path(expert, registry_pages.expert_detail, name="expert"),
    path(expert + "edit/", registry_pages.expert_edit, name="expert-edit"),
    path(expert + "upload/", registry_pages.expert_upload, name="expert-upload"),
    path(expert + "review/", registry_pages.review, name="expert-review"),
    path(expert + "aliases/", registry_pages.move_alias, name="expert-aliases"),
    path(expert + "try/", inference_pages.try_expert, name="expert-try"),
    path(expert + "train/", training_pages.train, name="expert-train"),
    path("publishers/<str:owner>/", registry_pages.publisher, name="publisher"),
    path("accounts/signup/", registry_pages.signup, name="signup"),
    path(
        "accounts/login/",
        throttle_posts(LoginThrottle)(auth_views.LoginView.as_view()),
        name="login",
    ),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("account/", registry_pages.account, name="account"),
    path("account/keys/<str:prefix>/revoke/", registry_pages.revoke_key, name="revoke-key"),
    path("account/usage/", inference_pages.usage, name="usage-page"),
    path("account/webhooks/", webhooks_pages.webhook_list, name="webhooks"),
    path("account/webhooks/<int:pk>/delete/", webhooks_pages.webhook_delete, name="webhook-delete"),
    path(
        "account/webhooks/<int:pk>/switch-on/",
        webhooks_pages.webhook_switch_on,
        name="webhook-switch-on",
    ),
    path("datasets/", training_pages.dataset_list, name="datasets"),
    path("leaderboards/", training_pages.leaderboards, name="leaderboards"),
    path("domains/<slug:slug>/leaderboard/", training_pages.leaderboard, name="leaderboard"),
    path("jobs/", training_pages.job_list, name="jobs"),
    path("jobs/<int:pk>/", training_pages.job_detail, name="job"),
    path("jobs/<int:pk>/cancel/", training_pages.job_cancel, name="job-cancel"),
]

urlpatterns = [
    *pages,
    path("admin/", admin.site.urls),
    path("api/v1/", include("registry.urls")),
    path("api/v1/", include("training.urls")),
    path("api/v1/", include("webhooks.urls")),
    path("", include("inference.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    # Last: what no API route matched is a JSON 404 (handler404 answers so only with DEBUG off),
    # for any method: a 404 changes nothing, so it needs no CSRF token (as handler404 does not).
    re_path(r"^(api|v1)/", csrf_exempt(not_found)),
]

handler404 = "registry.page_tools.not_found"
