"""Step handlers for the chaos suite, loaded with SWITCHYARD_PLUGINS in every process.

Each execution of a step is recorded in the ledger, a table of the (private) database that
the chaos driver creates: a row when the handler starts (run, step, attempt, process) and its
result when it returns. The result carries the execution's id (`exec`), so that afterwards the
checks know which execution's output the engine committed, and can count any other execution
of a committed step. The ledger is written in autocommit, outside the engine's transactions:
a crash after the row is written leaves it there, as a real side effect would.

Kinds: `llm` and `retrieval` keep their built-in handlers (simulated provider, full-text
search) wrapped with the ledger; the tools are `chaos.work`, `chaos.items`, `chaos.long`
(outlasts RabbitMQ's consumer_timeout) and `chaos.poison` (kills its process every time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import time
import uuid
from typing import Any

from django.db import connection

from jobs.steps import registry
from jobs.steps.registry import StepContext, StepFailure, register_tool

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS chaos_ledger (
    id bigserial PRIMARY KEY,
    exec_id uuid NOT NULL UNIQUE,
    run_id uuid NOT NULL,
    step_key text NOT NULL,
    kind text NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    result jsonb,
    committed boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS chaos_ledger_step ON chaos_ledger (run_id, step_key);
"""


def _step_key(ctx: StepContext) -> str:
    return ctx.step_id if ctx.map_index is None else f"{ctx.step_id}[{ctx.map_index}]"


def _record(ctx: StepContext, produce) -> dict[str, Any]:
    exec_id = uuid.uuid4()
    # Like any careful side effect, reconnect if PostgreSQL restarted since the last query.
    connection.close_if_unusable_or_obsolete()
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO chaos_ledger (exec_id, run_id, step_key, kind, attempt, pid) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            [exec_id, ctx.run_id, _step_key(ctx), ctx.kind, ctx.attempt, os.getpid()],
        )
    result = {**produce(), "exec": str(exec_id)}
    connection.close_if_unusable_or_obsolete()
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE chaos_ledger SET finished_at = clock_timestamp(), result = %s "
            "WHERE exec_id = %s",
            [json.dumps(result), exec_id],
        )
    return result


def llm(ctx: StepContext) -> dict[str, Any]:
    from jobs.steps.llm import handle

    return _record(ctx, lambda: handle(ctx))


def retrieval(ctx: StepContext) -> dict[str, Any]:
    from jobs.steps.retrieval import handle

    return _record(ctx, lambda: handle(ctx))


registry.register_kind(
    dataclasses.replace(registry.kind("llm"), handler="tests.reliability.plugin.llm")
)
registry.register_kind(
    dataclasses.replace(registry.kind("retrieval"), handler="tests.reliability.plugin.retrieval")
)


def _fails(ctx: StepContext, fail_rate: float) -> bool:
    # Seeded by step and attempt, like the simulated provider: a replayable failure pattern.
    return random.Random(f"{ctx.idempotency_key}#{ctx.attempt}").random() < fail_rate


@register_tool("chaos.work")
def work(ctx: StepContext, value: Any = None, sleep_ms: int = 0, fail_rate: float = 0.0):
    """Record the execution, take `sleep_ms`, fail retryably at `fail_rate`, return `value`."""

    def produce() -> dict[str, Any]:
        if sleep_ms:
            time.sleep(min(sleep_ms / 1000, ctx.seconds_left()))
        if fail_rate and _fails(ctx, fail_rate):
            raise StepFailure(f"simulated failure (fail_rate={fail_rate:g})", code="flaky")
        return {"value": value}

    return _record(ctx, produce)


@register_tool("chaos.items")
def items(ctx: StepContext, n: int = 3):
    """The list a map fans out over."""
    return _record(ctx, lambda: {"items": [f"item-{index}" for index in range(int(n))]})


@register_tool("chaos.long")
def long(ctx: StepContext, seconds: float = 15.0):
    """Outlast RabbitMQ's consumer_timeout while holding (or not) the delivery."""

    def produce() -> dict[str, Any]:
        time.sleep(seconds)
        return {"slept_s": seconds}

    return _record(ctx, produce)


@register_tool("chaos.poison")
def poison(ctx: StepContext):
    """A step that kills the process running it, every time."""

    def produce() -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)
        return {"unreachable": True}

    return _record(ctx, produce)
