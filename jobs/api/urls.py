from django.urls import path

from jobs.api import streams, views
from jobs.api.account import (
    ApiKeyDetailView,
    ApiKeyListView,
    WebhookSecretRotateView,
    WebhookSecretView,
)
from jobs.api.cors import cors_for_run
from jobs.api.stream_tokens import StreamTokenView

app_name = "api"

urlpatterns = [
    path("workflows/", views.WorkflowListView.as_view(), name="workflow-list"),
    path("workflows/<str:name>/", views.WorkflowDetailView.as_view(), name="workflow-detail"),
    # Async fronts of the DRF views: they wait (?wait=) and stream (SSE), and hand the rest on.
    path("runs/", streams.run_list, name="run-list"),
    path("runs/<str:run_id>/", streams.run_detail, name="run-detail"),
    # What a browser reads, with CORS for the run's tenant's allowed origins.
    path("runs/<str:run_id>/events/", cors_for_run("GET")(streams.run_events), name="run-events"),
    path(
        "runs/<str:run_id>/stream-token/",
        cors_for_run("POST")(StreamTokenView.as_view()),
        name="run-stream-token",
    ),
    path("runs/<str:run_id>/cancel/", views.RunCancelView.as_view(), name="run-cancel"),
    path("runs/<str:run_id>/retry/", views.RunRetryView.as_view(), name="run-retry"),
    path("documents/", views.DocumentsView.as_view(), name="documents"),
    path("keys/", ApiKeyListView.as_view(), name="key-list"),
    path("keys/<str:key_id>/", ApiKeyDetailView.as_view(), name="key-detail"),
    path("webhook-secret/", WebhookSecretView.as_view(), name="webhook-secret"),
    path("webhook-secret/rotate/", WebhookSecretRotateView.as_view(), name="webhook-secret-rotate"),
]
