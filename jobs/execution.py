"""What a worker does with one step message: claim, run the kind's handler, report.

The claim, the report and every transition they cause are transactions of
`jobs.transitions.steps`; this module only runs the handler between them and turns its result
or exception into the right report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import psycopg.errors
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connections
from django.utils import timezone

from approvals.services import step_request_approval
from jobs.events import DeltaCoalescer
from jobs.steps import registry
from jobs.steps.registry import StepContext, StepFailure
from jobs.transitions.steps import (
    Claim,
    step_claim,
    step_complete,
    step_fail,
    step_start_child_run,
)
from orchestrator.logcontext import bind_log_context

log = logging.getLogger(__name__)

T = TypeVar("T")


def step_execute(*, step_run_id: int, dispatch_token: str, worker: str) -> None:
    # Every log line of this step (the worker's own "succeeded" line too) carries its ids.
    bind_log_context(step=f"#{step_run_id}")
    # A message waits in the broker no longer than the stale-dispatch time before it is
    # re-published under a new token, which refuses this claim anyway: retry until then.
    claim_until = timezone.now() + timedelta(seconds=settings.SWITCHYARD_DISPATCH_STALE_S)
    claim = _retrying(
        lambda: step_claim(step_run_id=step_run_id, dispatch_token=dispatch_token, worker=worker),
        until=claim_until,
        what=f"claim of step run {step_run_id}",
    )
    if claim is None:
        log.info("dropped stale message for step run %s", step_run_id)
        return
    bind_log_context(tenant=claim.tenant_id, run=claim.run_public_id, step=_key(claim))

    def report(transition: Callable[[], object]) -> None:
        _retrying(transition, until=claim.lease_expires_at, what=f"report of {_key(claim)}")

    if claim.kind == "workflow":
        report(lambda: step_start_child_run(claim=claim))
        return
    if claim.kind == "approval":
        report(lambda: step_request_approval(claim=claim))
        return
    try:
        output = _run_handler(claim)
    except StepFailure as failure:
        error, code, retryable = failure.message, failure.code, failure.retryable
        report(lambda: step_fail(claim=claim, error=error, code=code, retryable=retryable))
        return
    except Exception as exc:
        log.exception("step %s attempt %s raised", claim.idempotency_key, claim.attempt)
        error = f"{type(exc).__name__}: {exc}"
        report(lambda: step_fail(claim=claim, error=error, code="exception", retryable=True))
        return
    if timezone.now() > claim.deadline:
        report(
            lambda: step_fail(
                claim=claim,
                error="the step finished after its timeout",
                code="timeout",
                retryable=True,
            )
        )
        return
    report(lambda: step_complete(claim=claim, output=output))


def _retrying(transition: Callable[[], T], *, until: datetime | None, what: str) -> T:
    """Run a claim or a report, retrying it while `until` has not passed when PostgreSQL
    refused it for a transient reason: a lock wait past `lock_timeout` (another process holds
    the run, perhaps stalled), the session ended by the idle-in-transaction timeout or a
    restart, a deadlock. Finished work is then kept instead of being left to its lease's
    expiry. Each try is a whole transaction (the compare-and-sets make a retry of one that did
    commit harmless: it is refused). The last error is raised once `until` has passed.
    """
    delay = 0.05
    while True:
        try:
            return transition()
        except DatabaseError as exc:
            if not _transient(exc):
                raise
            if until is None or timezone.now() + timedelta(seconds=delay) >= until:
                raise
            log.warning("%s refused (%s); retrying in %.2fs", what, exc, delay)
            _drop_connections()
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


# Django wraps psycopg's errors by their SQLSTATE class: a lock timeout, a deadlock, a
# cancelled statement or a server shutdown arrive as OperationalError, but the end of a session
# whose transaction a stalled process kept open past `idle_in_transaction_session_timeout`
# (25P03, raised on its next statement) arrives as InternalError (found by test_worker_pause:
# that report was abandoned to a 5-minute lease).
def _transient(exc: DatabaseError) -> bool:
    return isinstance(exc, (OperationalError, InterfaceError)) or isinstance(
        exc.__cause__, psycopg.errors.IdleInTransactionSessionTimeout
    )


def _drop_connections() -> None:
    """Close this thread's connections (a pooled one goes back to its pool, which discards it
    if broken), so that the next try starts on a healthy one."""
    for conn in connections.all(initialized_only=True):
        if not conn.in_atomic_block:
            conn.close()


def _key(claim: Claim) -> str:
    return claim.step_id if claim.map_index is None else f"{claim.step_id}[{claim.map_index}]"


def _recheck_connections() -> None:
    """Before the report: drop a database connection that broke while the handler ran (a
    PostgreSQL restart, a failed query of the handler's own) and health-check the others on
    their next use, so that the report reconnects instead of failing, which would leave a
    finished attempt to expire with its lease (found by the chaos suite)."""
    for conn in connections.all(initialized_only=True):
        if not conn.in_atomic_block:
            conn.close_if_unusable_or_obsolete()


def _release_pooled_connections() -> None:
    """Before the handler: give a pooled connection back for the handler's duration.

    A threads pool of 64 LLM slots then needs connections only for its claims and reports,
    not one per step for as long as a model takes to answer. Without a pool the connection is
    kept (reopening it would cost more than it saves)."""
    for conn in connections.all(initialized_only=True):
        if getattr(conn, "pool", None) is not None and not conn.in_atomic_block:
            conn.close()


def _run_handler(claim: Claim) -> Any:
    spec = registry.kind(claim.kind)
    handler = spec.load_handler()
    # Providers emit a delta per token chunk (the OpenAI stream: often 50+ a second); live
    # clients get at most ~20 messages a second per step.
    deltas = DeltaCoalescer(
        claim.run_public_id, claim.step_id, claim.map_index, attempt=claim.attempt
    )
    context = StepContext(
        run_id=str(claim.run_public_id),
        tenant_id=claim.tenant_id,
        step_id=claim.step_id,
        map_index=claim.map_index,
        kind=claim.kind,
        attempt=claim.attempt,
        input=claim.input,
        idempotency_key=claim.idempotency_key,
        deadline=claim.deadline,
        emit_delta=deltas.emit,
    )
    _release_pooled_connections()
    try:
        output = handler(context)
    finally:
        deltas.close()
        _recheck_connections()
    try:
        json.dumps(output)
    except (TypeError, ValueError) as exc:
        raise StepFailure(
            f"the {claim.kind} handler returned a value that is not JSON: {exc}",
            code="bad_output",
            retryable=False,
        ) from None
    return output
