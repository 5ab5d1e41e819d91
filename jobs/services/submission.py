"""Submitting a run from the client API: idempotency keys, backpressure, the webhook URL policy.

`run_submit` is the API's door to `run_insert` (child runs are created by the engine, without
any of this). It only writes PostgreSQL, in one statement: the broker is never on the path of
a submission, so a submission succeeds while RabbitMQ is down.

Idempotency: a key matches the tenant's run that holds it for `SWITCHYARD_IDEMPOTENCY_TTL_S`
after that run was created. The partial unique constraint on (tenant, idempotency_key) stays
the guard against concurrent requests; an expired key is released (cleared on the old run) in
the transaction that creates the new run, so two requests that reuse an expired key at once
still create one run (docs/decisions.md).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import IntegrityError

from jobs import selectors
from jobs.definitions import Fault
from jobs.models import Run, WorkflowVersion
from jobs.steps.netguard import ForbiddenURL, check_outbound_url
from jobs.transitions.runs import RunError, SubmissionChecks, run_insert
from tenants.models import Tenant


class IdempotencyConflict(RunError):
    """The Idempotency-Key is held by a run submitted with another body."""

    def __init__(self, run: Run):
        super().__init__(
            "this Idempotency-Key was used with a different request body",
            code="idempotency_key_reused",
        )
        self.run = run


class Backpressure(RunError):
    """Submission refused for now; `retry_after` (seconds) goes to the Retry-After header."""

    def __init__(self, message: str, *, code: str, retry_after: int):
        super().__init__(message, code=code)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Submission:
    run: Run
    created: bool  # False: an earlier request with the same Idempotency-Key created `run`


def run_submit(
    *,
    tenant: Tenant,
    version: WorkflowVersion,
    input: dict[str, Any],
    lane: str | None = None,
    webhook_url: str = "",
    idempotency_key: str = "",
    request_hash: str = "",
    cached_version: bool = False,
    latest: bool = False,
    api_key_id: int | None = None,
) -> Submission:
    """Create a run for a client, or return the run its Idempotency-Key already created.

    Raises IdempotencyConflict (same key, other body), Backpressure (a queue is full) or
    RunError (bad input, lane or webhook URL). A replay is answered before backpressure: a
    client retrying a submission that succeeded gets its run even when the queue is full.

    One statement (`run_insert`) checks the key, the tenant's queued-run quota, and, when the
    caller resolved `version` and the API key from its per-process caches, that `version`
    still exists and is still the latest if asked for as such (`cached_version`, `latest`),
    and that the key is not revoked (`api_key_id`): RunError `stale_version` / `key_revoked`
    then, for the caller to refresh its cache.
    """
    _check_webhook_url(webhook_url)
    _platform_backlog_check()
    checks = SubmissionChecks(
        idempotency_ttl_s=settings.SWITCHYARD_IDEMPOTENCY_TTL_S,
        cached_version=cached_version,
        latest=latest,
        api_key_id=api_key_id,
    )
    try:
        created = run_insert(
            tenant=tenant,
            version=version,
            input=input,
            lane=lane,
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            checks=checks,
        )
    except IntegrityError:
        # Two requests released the same expired key at once: the other one's run holds it.
        holder = selectors.run_by_idempotency_key(tenant=tenant, key=idempotency_key)
        if not idempotency_key or holder is None:
            raise
        return _replay(holder, request_hash)
    if created.outcome == "replay":
        return _replay(created.run, request_hash)
    if created.outcome == "queued_runs_full":
        retry_after = settings.SWITCHYARD_API_RETRY_AFTER_S
        raise Backpressure(
            f"tenant {tenant.slug!r} has {created.queued} queued runs, its max_queued_runs "
            f"quota; retry after {retry_after}s",
            code="queued_runs_quota_full",
            retry_after=retry_after,
        )
    if created.outcome != "created":
        raise RunError(f"submission refused: {created.outcome}", code=created.outcome)
    return Submission(run=created.run, created=True)


def request_fingerprint(body: dict[str, Any]) -> str:
    """What an Idempotency-Key's replay must match: the request body, canonically hashed."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _replay(run: Run, request_hash: str) -> Submission:
    if run.request_hash != request_hash:
        raise IdempotencyConflict(run)
    return Submission(run=run, created=False)


def _check_webhook_url(url: str) -> None:
    if not url:
        return
    try:
        check_outbound_url(url)
    except ForbiddenURL as exc:
        raise RunError(
            str(exc), code="forbidden_webhook_url", faults=[Fault("webhook_url", str(exc))]
        ) from None
    except OSError as exc:
        message = f"cannot resolve the host of {url}: {exc}"
        raise RunError(
            message, code="invalid_webhook_url", faults=[Fault("webhook_url", message)]
        ) from None


# --- backpressure ------------------------------------------------------------------------------

# The platform backlog is counted at most this often per process: a count of up to
# SWITCHYARD_PLATFORM_MAX_BACKLOG rows is too dear for every submission, and a coarse guard
# loses nothing by being a second late.
PLATFORM_BACKLOG_CACHE_S = 1.0
_backlog_cache: dict[str, float] = {}
_backlog_lock = threading.Lock()


def platform_backlog(*, cap: int) -> int:
    """Steps waiting for a worker platform-wide (cached for PLATFORM_BACKLOG_CACHE_S)."""
    now = time.monotonic()
    with _backlog_lock:
        if _backlog_cache.get("expires", 0.0) > now and _backlog_cache.get("cap") == cap:
            return int(_backlog_cache["value"])
    value = selectors.platform_backlog_count(cap=cap)
    with _backlog_lock:
        _backlog_cache.update(value=value, cap=cap, expires=now + PLATFORM_BACKLOG_CACHE_S)
    return value


def platform_backlog_cache_clear() -> None:
    with _backlog_lock:
        _backlog_cache.clear()


def _platform_backlog_check() -> None:
    """503 when `SWITCHYARD_PLATFORM_MAX_BACKLOG` steps of active tenants wait for a worker
    (counted at most once a second per process)."""
    retry_after = settings.SWITCHYARD_API_RETRY_AFTER_S
    limit = settings.SWITCHYARD_PLATFORM_MAX_BACKLOG
    backlog = platform_backlog(cap=limit)
    if backlog >= limit:
        raise Backpressure(
            f"the platform backlog is {backlog} steps waiting for a worker, at its limit "
            f"(SWITCHYARD_PLATFORM_MAX_BACKLOG={limit}); retry after {retry_after}s",
            code="platform_backlog_full",
            retry_after=retry_after,
        )
