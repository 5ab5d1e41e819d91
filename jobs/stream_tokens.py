"""Stream tokens: short-lived, single-run, read-only credentials for browsers (docs/api.md).

A browser's `EventSource` cannot send an `Authorization` header, and an API key must never
reach a browser. The tenant's backend mints a token for one run
(`POST /api/v1/runs/{id}/stream-token/`) and hands it to the page, which passes it as
`?token=` to that run's SSE stream or WebSocket: the only two places it is accepted. It is
no API key (it does not start with `sy_`), so `Authorization: Bearer <token>` is refused like
any unknown key.

The token is `django.core.signing` over {run, tenant, expiry} with a salt of its own, so a
signature made for anything else in the product (sessions, other signed values) never passes
as one. Nothing is stored: a token cannot be revoked, which is why it lives minutes
(`SWITCHYARD_STREAM_TOKEN_TTL_S`) and can only read one run's events.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.core import signing

from jobs.formats import parse_uuid
from jobs.models import Run

SALT = "switchyard.stream-token.v1"


class StreamTokenRefused(Exception):
    """Why a token opens nothing: an HTTP status, an error code and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class StreamGrant:
    run: uuid.UUID
    tenant: uuid.UUID
    expires_at: datetime


def stream_token_mint(*, run: Run, now: datetime) -> tuple[str, datetime]:
    """A token for `run` (the caller has checked that it is its tenant's), and its expiry."""
    expires_at = now + timedelta(seconds=settings.SWITCHYARD_STREAM_TOKEN_TTL_S)
    payload = {
        "r": str(run.public_id),
        "t": str(run.tenant.public_id),
        "e": int(expires_at.timestamp()),
    }
    token = signing.dumps(payload, salt=SALT, compress=False)
    return token, datetime.fromtimestamp(payload["e"], tz=UTC)


def stream_token_read(token: str, *, now: datetime) -> StreamGrant:
    """The grant a token carries; raises StreamTokenRefused if tampered with or expired."""
    try:
        payload = signing.loads(token, salt=SALT)
        grant = StreamGrant(
            run=uuid.UUID(payload["r"]),
            tenant=uuid.UUID(payload["t"]),
            expires_at=datetime.fromtimestamp(int(payload["e"]), tz=UTC),
        )
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        raise StreamTokenRefused(401, "unauthenticated", "invalid stream token") from None
    if grant.expires_at <= now:
        raise StreamTokenRefused(401, "unauthenticated", "stream token expired") from None
    return grant


def run_for_stream_token(token: str, *, run_id: str, now: datetime) -> Run:
    """The run that `token` opens at the URL of run `run_id`.

    Raises StreamTokenRefused: 401 for a bad or expired token, 403 for a token of another
    run, 404 if the run is gone or no longer its tenant's.
    """
    grant = stream_token_read(token, now=now)
    if parse_uuid(run_id) != grant.run:
        raise StreamTokenRefused(403, "forbidden", "this stream token is for another run")
    run = (
        Run.objects.select_related("tenant")
        .filter(public_id=grant.run, tenant__public_id=grant.tenant)
        .first()
    )
    if run is None:
        raise StreamTokenRefused(404, "not_found", "run not found")
    return run
