"""Operator pages. The full live dashboard is its own issue; here: the landing page and a
health check that load balancers and `make run` can poll."""

from __future__ import annotations

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/home.html")


def healthz(request: HttpRequest) -> JsonResponse:
    """200 when PostgreSQL answers; the body says so. Used by `make run` to wait for web."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        database = "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        database = f"error: {exc}"
    healthy = database == "ok"
    return JsonResponse({"database": database}, status=200 if healthy else 503)
