from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from dashboard import metrics as dashboard_metrics
from dashboard import views as dashboard_views

urlpatterns = [
    path("", dashboard_views.home, name="home"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("jobs.api.urls")),
    path("api/v1/", include("schedules.urls")),
    path("api/v1/", include("approvals.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("healthz", dashboard_views.healthz, name="healthz"),
    path("inbox/", include("approvals.inbox.urls")),
    path("dashboard/", include("dashboard.urls")),
    path("metrics", dashboard_metrics.metrics, name="metrics"),
    # Operators land on the dashboard after signing in, reviewers on the inbox.
    path("accounts/login/", dashboard_views.SignInView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(next_page="login"), name="logout"),
]

# Under /api/ these answer in the API's error envelope; elsewhere, Django's pages.
handler404 = "jobs.api.errors.page_not_found"
handler500 = "jobs.api.errors.server_error"
