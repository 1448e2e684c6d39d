from django.urls import path

from . import views

app_name = "inference"

urlpatterns = [
    path("api/v1/generate", views.GenerateView.as_view(), name="generate"),
    path("api/v1/attach", views.AttachView.as_view(), name="attach"),
    path("api/v1/usage/", views.UsageView.as_view(), name="usage"),
    path("v1/models", views.ModelsView.as_view(), name="openai-models"),
    path("v1/completions", views.CompletionsView.as_view(), name="openai-completions"),
    path("v1/chat/completions", views.ChatCompletionsView.as_view(), name="openai-chat"),
]
