"""Backlogs in bulk: clone a run made by `run_create`, with its steps and its events, in SQL.

Creating thousands of runs one `run_create` at a time would take the bench longer than the
scenarios that use them. A template run is created through the service (so it is exactly what
a submission makes: the run, its steps with the first ones ready and their rendered input, its
first events), then copied `INSERT … SELECT … generate_series` in one statement per table.
The column lists come from the models, so the copy follows the schema as it changes.
"""

from __future__ import annotations


def _columns(model) -> list[str]:
    return [field.column for field in model._meta.concrete_fields if field.column != "id"]


def clone_runs(template_pk: int, copies: int) -> list[int]:
    """`copies` copies of run `template_pk` (new public ids, created now); their pks."""
    from django.db import connection, transaction

    from jobs.models import Event, Run, StepRun

    if copies <= 0:
        return []
    run_columns = _columns(Run)
    step_columns = _columns(StepRun)
    event_columns = _columns(Event)
    run_select = [
        "gen_random_uuid()" if c == "public_id" else "now()" if c == "created_at" else f"t.{c}"
        for c in run_columns
    ]
    step_select = ["r.id" if c == "run_id" else f"s.{c}" for c in step_columns]
    event_select = ["r.id" if c == "run_id" else f"e.{c}" for c in event_columns]
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO jobs_run ({", ".join(run_columns)})
            SELECT {", ".join(run_select)}
            FROM jobs_run t, generate_series(1, %s)
            WHERE t.id = %s
            RETURNING id
            """,
            [copies, template_pk],
        )
        new_runs = [row[0] for row in cursor.fetchall()]
        for table, columns, select, alias in (
            ("jobs_steprun", step_columns, step_select, "s"),
            ("jobs_event", event_columns, event_select, "e"),
        ):
            cursor.execute(
                f"""
                INSERT INTO {table} ({", ".join(columns)})
                SELECT {", ".join(select)}
                FROM {table} {alias}, unnest(%s::bigint[]) AS r(id)
                WHERE {alias}.run_id = %s
                """,
                [new_runs, template_pk],
            )
    return new_runs


def template_run(tenant, version) -> int:
    """A run made by `run_create` whose first steps stay `ready` (a backlog's template: no
    direct admission, which would queue them, and its copies with them)."""
    from django.test.utils import override_settings

    from jobs.transitions.runs import run_create

    with override_settings(SWITCHYARD_DIRECT_ADMISSION=False):
        return run_create(tenant=tenant, version=version, input={}).pk


def backlog(tenant, version, runs: int) -> list[int]:
    """`runs` runs of `version` for `tenant`: one made by `run_create`, the rest its copies."""
    template = template_run(tenant, version)
    return [template, *clone_runs(template, runs - 1)]
