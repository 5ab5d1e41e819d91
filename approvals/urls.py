"""The approvals API, under /api/v1/ (approvals.api)."""

from django.urls import path

from approvals import api

app_name = "approvals-api"

urlpatterns = [
    path("approvals/", api.ApprovalListView.as_view(), name="approval-list"),
    path("approvals/<str:approval_id>/", api.ApprovalDetailView.as_view(), name="approval-detail"),
    path(
        "approvals/<str:approval_id>/decision/",
        api.ApprovalDecisionView.as_view(),
        name="approval-decision",
    ),
]
