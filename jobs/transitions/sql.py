"""The transitions' SQL functions (`sql/functions.sql`) as Python calls.

Each call is one statement, one round trip. The functions are created by migrations: a
change of `functions.sql` comes with a new migration that runs it again (`install_sql`).
Timestamps are PostgreSQL's `clock_timestamp()` (when the statement runs, not when its
transaction began): one clock for every transition of the hot path.
"""

from __future__ import annotations

import json
import uuid
from datetime import date, datetime
from pathlib import Path
from typing import Any

from django.db import connection

FUNCTIONS_SQL = Path(__file__).with_name("sql") / "functions.sql"

FUNCTIONS = (
    "switchyard_log_append(bigint, uuid, jsonb)",
    "switchyard_step_claim(bigint, uuid, text, double precision)",
    "switchyard_step_report(bigint, bigint, uuid, integer, text, text, text, jsonb, text, text,"
    " text, timestamptz, jsonb, bigint, date)",
    "switchyard_steps_admit(bigint[])",
    "switchyard_fair_position(text, bigint, text, jsonb)",
    "switchyard_others_ready(text, bigint)",
    "switchyard_tenant_next_steps(bigint, text, integer, integer, bigint[], jsonb)",
    "switchyard_admission_lock_wait(bigint, integer)",
    "switchyard_admission_worth_waiting(text[], bigint, integer, text, jsonb)",
    "switchyard_run_apply(bigint, jsonb)",
    "switchyard_run_submit(jsonb, jsonb)",
)


def install_sql() -> str:
    """The SQL that (re)creates the functions, for migrations' RunSQL."""
    return FUNCTIONS_SQL.read_text()


def uninstall_sql() -> str:
    return "\n".join(f"DROP FUNCTION IF EXISTS {signature};" for signature in FUNCTIONS)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _call(sql: str, params: list[Any]) -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        value = cursor.fetchone()[0]
    return json.loads(value) if isinstance(value, str) else value


def step_claim(*, step_run_id: int, token: uuid.UUID, worker: str, grace_s: float) -> dict:
    return _call(
        "SELECT switchyard_step_claim(%s::bigint, %s::uuid, %s::text, %s::double precision)",
        [step_run_id, token, worker, grace_s],
    )


def step_report(
    *,
    step_run_id: int,
    run_pk: int,
    token: uuid.UUID,
    attempt: int,
    reported: str,
    status: str,
    outcome: str,
    output: Any = None,
    error: str = "",
    step_error: str = "",
    code: str = "",
    retry_at: datetime | None = None,
    event: dict[str, Any],
    llm_tokens: int = 0,
    day: date,
) -> dict:
    return _call(
        "SELECT switchyard_step_report(%s::bigint, %s::bigint, %s::uuid, %s::integer, %s::text,"
        " %s::text, %s::text, %s::jsonb, %s::text, %s::text, %s::text, %s::timestamptz, %s::jsonb,"
        " %s::bigint, %s::date)",
        [
            step_run_id,
            run_pk,
            token,
            attempt,
            reported,
            status,
            outcome,
            None if status != "succeeded" else _dumps(output),
            error,
            step_error,
            code,
            retry_at,
            _dumps(event),
            llm_tokens,
            day,
        ],
    )


def steps_admit(*, step_run_ids: list[int]) -> dict:
    return _call("SELECT switchyard_steps_admit(%s::bigint[])", [step_run_ids])


def run_apply(*, run_pk: int, plan: dict[str, Any]) -> dict:
    return _call("SELECT switchyard_run_apply(%s::bigint, %s::jsonb)", [run_pk, _dumps(plan)])


def run_submit(*, run: dict[str, Any], plan: dict[str, Any]) -> dict:
    return _call("SELECT switchyard_run_submit(%s::jsonb, %s::jsonb)", [_dumps(run), _dumps(plan)])


def parse_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)
