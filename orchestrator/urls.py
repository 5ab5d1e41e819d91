from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from dashboard import views as dashboard_views

urlpatterns = [
    path("", dashboard_views.home, name="home"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("jobs.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("healthz", dashboard_views.healthz, name="healthz"),
]
