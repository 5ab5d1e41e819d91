"""Routes of the reviewers' inbox, mounted at /inbox/."""

from django.urls import path

from approvals.inbox import views

app_name = "inbox"

urlpatterns = [
    path("", views.inbox, name="list"),
    path("history/", views.history, name="history"),
    path("<str:approval_id>/", views.detail, name="detail"),
]
