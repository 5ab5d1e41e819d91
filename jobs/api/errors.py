"""The one error envelope of the API: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

log = logging.getLogger(__name__)

# The answer to a request that could not get a database connection (PostgreSQL unreachable or
# restarting, the pool exhausted past its timeout, a deadlock victim), from the DRF views here
# and from the async long-lived views (`jobs.api.streams`): nothing was recorded, retry.
DATABASE_UNAVAILABLE = (
    503,
    "database_unavailable",
    "the database is unavailable or busy; nothing was recorded, retry shortly",
)
DATABASE_RETRY_AFTER = {"Retry-After": "1"}


class ApiError(exceptions.APIException):
    def __init__(
        self,
        *,
        status_code: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail=message, code=code)
        self.status_code = status_code
        self.error_code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def not_found(what: str = "run") -> ApiError:
    return ApiError(status_code=404, code="not_found", message=f"{what} not found")


_CODES = {
    status.HTTP_400_BAD_REQUEST: "invalid_request",
    status.HTTP_401_UNAUTHORIZED: "unauthenticated",
    status.HTTP_403_FORBIDDEN: "forbidden",
    status.HTTP_404_NOT_FOUND: "not_found",
    status.HTTP_405_METHOD_NOT_ALLOWED: "method_not_allowed",
    status.HTTP_406_NOT_ACCEPTABLE: "not_acceptable",
    status.HTTP_413_REQUEST_ENTITY_TOO_LARGE: "payload_too_large",
    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE: "unsupported_media_type",
    status.HTTP_429_TOO_MANY_REQUESTS: "rate_limited",
}


def _flatten(detail: Any, prefix: str = "") -> list[dict[str, str]]:
    """DRF's nested validation errors as a list of {path, message}."""
    if isinstance(detail, dict):
        faults = []
        for key, value in detail.items():
            if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
                path = f"{prefix}[{key}]"
            else:
                path = key if not prefix else f"{prefix}.{key}"
            if key == "non_field_errors":
                path = prefix or "$"
            faults.extend(_flatten(value, path))
        return faults
    if isinstance(detail, list):
        if all(not isinstance(item, dict | list) for item in detail):
            return [{"path": prefix or "$", "message": str(item)} for item in detail]
        faults = []
        for index, item in enumerate(detail):
            faults.extend(_flatten(item, f"{prefix}[{index}]"))
        return faults
    return [{"path": prefix or "$", "message": str(detail)}]


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return Response({"error": body}, status=status_code, headers=headers)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, RequestDataTooBig):  # a view that read request.body past the limit
        return error_response(
            413,
            "payload_too_large",
            f"the request body is larger than the limit of "
            f"{settings.SWITCHYARD_API_MAX_BODY_BYTES} bytes (SWITCHYARD_API_MAX_BODY_BYTES)",
        )
    if isinstance(exc, ApiError):
        return error_response(
            exc.status_code, exc.error_code, exc.message, exc.details, exc.headers
        )
    if isinstance(exc, OperationalError):
        # PostgreSQL unreachable or restarting, no pooled connection free within
        # DATABASE_POOL_TIMEOUT_S, or a deadlock victim: nothing was committed, so the client
        # may retry (with its Idempotency-Key) and lose nothing.
        log.warning("answered 503 to %s: %s", context.get("request"), exc)
        return error_response(*DATABASE_UNAVAILABLE, headers=dict(DATABASE_RETRY_AFTER))
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    code = _CODES.get(response.status_code, "error")
    if isinstance(exc, exceptions.ValidationError):
        faults = _flatten(exc.detail)
        message = "; ".join(f"{f['path']}: {f['message']}" for f in faults[:5])
        return error_response(400, "invalid_request", message, faults)
    if isinstance(exc, exceptions.ParseError):
        return error_response(400, "malformed_request", str(exc.detail))
    detail = response.data.get("detail") if isinstance(response.data, dict) else response.data
    return error_response(
        response.status_code,
        code,
        str(detail),
        headers={
            k: v
            for k, v in response.headers.items()
            if k in ("WWW-Authenticate", "Retry-After", "Allow")
        },
    )


# --- Django's own error pages, in the envelope under /api/ (orchestrator.urls handler404/500) ---


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(
            {"error": {"code": "not_found", "message": f"no API endpoint at {request.path}"}},
            status=404,
        )
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(
            {"error": {"code": "internal_error", "message": "internal server error"}},
            status=500,
        )
    return defaults.server_error(request)
