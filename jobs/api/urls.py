from django.urls import path

from jobs.api import views

app_name = "api"

urlpatterns = [
    path("workflows/", views.WorkflowListView.as_view(), name="workflow-list"),
    path("workflows/<str:name>/", views.WorkflowDetailView.as_view(), name="workflow-detail"),
    path("runs/", views.RunListView.as_view(), name="run-list"),
    path("runs/<str:run_id>/", views.RunDetailView.as_view(), name="run-detail"),
    path("runs/<str:run_id>/events/", views.RunEventsView.as_view(), name="run-events"),
    path("runs/<str:run_id>/cancel/", views.RunCancelView.as_view(), name="run-cancel"),
    path("runs/<str:run_id>/retry/", views.RunRetryView.as_view(), name="run-retry"),
    path("documents/", views.DocumentsView.as_view(), name="documents"),
]
