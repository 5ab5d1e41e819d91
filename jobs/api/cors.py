"""CORS for a run's browser-facing URLs: its events (the SSE stream) and its stream token.

A page may read these answers when its origin is one of the run's tenant's allowed origins
(`Tenant.allowed_origins`, tenants/origins.py). Per run, not per deployment: that is why this
is a decorator here and not django-cors-headers (docs/decisions.md, "CORS per tenant").

- Every answer carries `Vary: Origin`; an allowed origin gets `Access-Control-Allow-Origin:
  <origin>` (never `*`) and no `Allow-Credentials`: the streams take a token or an API key,
  never a cookie.
- A preflight (`OPTIONS` with `Access-Control-Request-Method`) is answered here, before any
  authentication (a browser sends no credentials with it): 204, with the allowed methods and
  headers if the origin is allowed, without them otherwise (the browser then stops).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse
from django.utils.cache import patch_vary_headers

from jobs import selectors
from jobs.feeds import db_call

ALLOWED_HEADERS = "Authorization, Content-Type, Last-Event-ID"
PREFLIGHT_MAX_AGE_S = "600"


def _is_preflight(request: HttpRequest) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def _preflight(origin: str | None, methods: str) -> HttpResponse:
    response = HttpResponse(status=204)
    if origin:
        response["Access-Control-Allow-Methods"] = methods
        response["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
        response["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE_S
    return response


def _finish(response: HttpResponse, origin: str | None) -> HttpResponse:
    patch_vary_headers(response, ["Origin"])
    if origin:
        response["Access-Control-Allow-Origin"] = origin
    return response


def _allowed(request: HttpRequest, run_id: str) -> str | None:
    """The request's Origin if the run's tenant allows it, else None."""
    origin = request.headers.get("Origin")
    if origin and selectors.run_tenant_allows_origin(run_id=run_id, origin=origin):
        return origin
    return None


def cors_for_run(methods: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """CORS for a view of one run (its URL has `run_id`), sync or async; `methods` is what
    a preflight allows, e.g. "GET"."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        if iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_view(request: HttpRequest, run_id: str, **kwargs: Any):
                # No Origin (an SDK, a same-origin page): no query, no thread hop.
                origin = None
                if "Origin" in request.headers:
                    origin = await db_call(_allowed)(request, run_id)
                if _is_preflight(request):
                    return _finish(_preflight(origin, methods), origin)
                return _finish(await view(request, run_id=run_id, **kwargs), origin)

            return markcoroutinefunction(async_view)

        @functools.wraps(view)
        def sync_view(request: HttpRequest, run_id: str, **kwargs: Any):
            origin = _allowed(request, run_id)
            if _is_preflight(request):
                return _finish(_preflight(origin, methods), origin)
            return _finish(view(request, run_id=run_id, **kwargs), origin)

        return sync_view

    return decorate
