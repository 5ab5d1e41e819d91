"""Tools for tests, loaded into worker processes with SWITCHYARD_PLUGINS=tests.support.tools.

Each call is recorded in a ledger: one line per call in `$SWITCHYARD_TEST_LEDGER/<key>.log`
(O_APPEND writes of a short line are atomic), so a test counts executions across processes.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from jobs.steps.registry import StepContext, StepFailure, register_tool


def ledger_dir() -> Path:
    return Path(os.environ.get("SWITCHYARD_TEST_LEDGER", "/tmp/switchyard-ledger"))


def record(key: str, note: str = "") -> int:
    """Append a call to the ledger of `key`; returns how many calls it now has."""
    path = ledger_dir() / f"{key}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as ledger:
        ledger.write(f"{os.getpid()} {note}\n")
    return len(path.read_text().splitlines())


def calls(key: str) -> list[str]:
    path = ledger_dir() / f"{key}.log"
    return path.read_text().splitlines() if path.exists() else []


@register_tool("test.count")
def count(ctx: StepContext, key: str, sleep_ms: int = 0, **extra):
    """Record the call, optionally sleep, return the call number and the arguments."""
    number = record(key, ctx.idempotency_key)
    if sleep_ms:
        time.sleep(sleep_ms / 1000)
    return {"key": key, "call": number, "extra": extra, "pid": os.getpid()}


@register_tool("test.flaky")
def flaky(ctx: StepContext, key: str, fail_times: int):
    """Fail (retryably) on the first `fail_times` calls, then succeed."""
    number = record(key, f"attempt {ctx.attempt}")
    if number <= fail_times:
        raise StepFailure(f"flaky failure {number} of {fail_times}", code="flaky")
    return {"succeeded_on_call": number}


@register_tool("test.fails_attempts")
def fails_attempts(ctx: StepContext, failures: int = 0, retryable: bool = True):
    """Fail the step's first `failures` attempts, then succeed. Decided by the attempt number
    alone (no ledger), so that a simulation replays the same way in any process."""
    if ctx.attempt <= failures:
        raise StepFailure(
            f"attempt {ctx.attempt} fails on purpose ({failures} planned)",
            code="planned",
            retryable=retryable,
        )
    return {"attempt": ctx.attempt}


@register_tool("test.fail")
def fail(ctx: StepContext, key: str, retryable: bool = True, code: str = "boom"):
    record(key)
    raise StepFailure(f"failed on purpose ({code})", code=code, retryable=retryable)


@register_tool("test.block_first")
def block_first(ctx: StepContext, key: str, block_s: float = 60.0):
    """The first call records its pid and blocks (to be killed); later calls return at once."""
    number = record(key, "started")
    if number == 1:
        (ledger_dir() / f"{key}.pid").write_text(str(os.getpid()))
        time.sleep(block_s)
        return {"call": number, "pid": os.getpid(), "late": True}
    return {"call": number, "pid": os.getpid()}


@register_tool("test.kill_self")
def kill_self(ctx: StepContext, key: str):
    """A poison step: records the call, then SIGKILLs the process that runs it."""
    record(key, f"attempt {ctx.attempt}")
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)
    return {"unreachable": True}


@register_tool(
    "test.refund",
    description="Refund an amount of an order (recorded in the ledger).",
    schema={
        "type": "object",
        "required": ["order", "amount"],
        "additionalProperties": False,
        "properties": {
            "order": {"type": "integer"},
            "amount": {"type": "number", "minimum": 0, "maximum": 500},
        },
    },
)
def refund(ctx: StepContext, order: int, amount: float):
    """Record the refund; return what was refunded (agents' approval tests)."""
    record(f"refund-{order}", ctx.idempotency_key)
    return {"refunded": {"order": order, "amount": amount}}
