"""Typed errors: one class per kind of answer in the API's error envelope
(`{"error": {"code", "message", "details"}}`), and one for a server that could not be reached."""

from __future__ import annotations

from typing import Any

import httpx


class SwitchyardError(Exception):
    """Everything this package raises."""


class ConnectionFailed(SwitchyardError):
    """The server could not be reached (or stopped answering) after every allowed retry."""


class WaitTimeout(SwitchyardError):
    """`runs.wait` ran out of time; `run` is the run as it stood then."""

    def __init__(self, run: Any, timeout: float) -> None:
        super().__init__(f"run {run.id} is still {run.status.value} after {timeout:g} s")
        self.run = run
        self.timeout = timeout


class ApiError(SwitchyardError):
    """An answer in the error envelope. `code` is stable (e.g. `not_found`), `message` is for
    people, `details` is for validation errors a list of `{"path", "message"}`."""

    status: int = 0

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after


class InvalidRequest(ApiError):
    """400: the body, input, definition or a parameter is wrong; `details` names each fault."""


class Unauthenticated(ApiError):
    """401: no API key, or an unknown or revoked one."""


class Forbidden(ApiError):
    """403: the key lacks the scope the operation needs."""


class NotFound(ApiError):
    """404: unknown, or another tenant's."""


class Conflict(ApiError):
    """409: the object's state forbids it (`run_final`, `not_failed`, `not_pending`), or an
    Idempotency-Key was reused with another body (`idempotency_key_reused`)."""


class PayloadTooLarge(ApiError):
    """413: the body is over the server's limit."""


class QuotaFull(ApiError):
    """429: the tenant's queued-run quota is full; retry after `retry_after` seconds."""


class Unavailable(ApiError):
    """503: the platform's backlog is full or its database unreachable; retry after
    `retry_after` seconds."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: QuotaFull,
    503: Unavailable,
}


def retry_after(response: httpx.Response) -> float | None:
    """The `Retry-After` header in seconds, if it is a number."""
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


def error_from(response: httpx.Response) -> ApiError:
    """The typed error for an error answer, in the envelope or not (a proxy's 502)."""
    try:
        body = response.json()["error"]
        code, message, details = body["code"], body["message"], body.get("details")
    except (ValueError, KeyError, TypeError):
        code, message, details = "http_error", response.text[:500] or response.reason_phrase, None
    kind = _BY_STATUS.get(response.status_code, ApiError)
    return kind(response.status_code, code, message, details, retry_after(response))
