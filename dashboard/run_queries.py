"""The dashboard's run queries (docs/dashboard.md): the filtered and paged runs list, one run's
page (steps, attempts, events, graph and timeline), and failed runs grouped by error.

Operators are staff and see all tenants, so nothing here is scoped by tenant; the views that
call these functions admit staff only.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from django.db import connection
from django.db.models import Q, QuerySet
from django.db.models.expressions import RawSQL
from django.utils import timezone

from dashboard.layout import items_by_map, map_items_done, run_gantt, run_graph
from jobs.models import Event, Run, RunStatus, StepAttempt, StepRun, StepStatus, WorkflowVersion
from jobs.statuses import RUN_FINAL
from jobs.transcripts import agent_transcripts
from jobs.transitions.txn import definition_of
from tenants.models import Lane, Tenant

RUNS_PAGE = 50
EVENTS_SHOWN = 200
# Step inputs and outputs longer than this are cut on the run page (with a note saying so).
JSON_SHOWN = 20_000
# Items of a map listed on the run page (failed items always are); the graph counts them all.
MAP_ITEMS_SHOWN = 20


# --- runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFilters:
    """The runs list's filters, as parsed from the query string (invalid values dropped)."""

    tenant: str = ""
    workflow: str = ""
    status: str = ""
    lane: str = ""
    since: datetime | None = None
    until: datetime | None = None
    error: str = ""
    fingerprint: str = ""

    @classmethod
    def from_query(cls, query: Any) -> RunFilters:
        def text(name: str, limit: int = 200) -> str:
            return (query.get(name) or "").strip()[:limit]

        status = text("status")
        lane = text("lane")
        fingerprint = text("fingerprint", 12)
        return cls(
            tenant=text("tenant", 64),
            workflow=text("workflow", 100),
            status=status if status in RunStatus.values else "",
            lane=lane if lane in Lane.values else "",
            since=_parse_time(text("since")),
            until=_parse_time(text("until")),
            error=text("error"),
            fingerprint=fingerprint if re.fullmatch(r"[0-9a-f]{12}", fingerprint) else "",
        )

    def as_query(self) -> dict[str, str]:
        values = {
            "tenant": self.tenant,
            "workflow": self.workflow,
            "status": self.status,
            "lane": self.lane,
            "since": _format_time(self.since),
            "until": _format_time(self.until),
            "error": self.error,
            "fingerprint": self.fingerprint,
        }
        return {name: value for name, value in values.items() if value}

    @property
    def is_empty(self) -> bool:
        return not self.as_query()


def _parse_time(value: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if timezone.is_naive(parsed):
        parsed = timezone.make_aware(parsed, timezone.get_default_timezone())
    return parsed


def _format_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M") if value else ""


# The error fingerprint: the error with ids and numbers masked, hashed (failures view).
FINGERPRINT_SQL = (
    "left(md5(regexp_replace(regexp_replace(left({col}, 500), "
    "'[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}', '<id>', 'gi'), "
    "'[0-9]+', 'N', 'g')), 12)"
)


def runs_matching(filters: RunFilters) -> QuerySet[Run]:
    """The runs that match `filters`, unordered.

    Tenant and workflow are resolved to ids first (two tiny queries), so that PostgreSQL
    plans the big query with literal values it has statistics for, rather than through joins
    it cannot estimate.
    """
    runs = Run.objects.all()
    tenant_id = None
    if filters.tenant:
        tenant_id = Tenant.objects.filter(slug=filters.tenant).values_list("id", flat=True).first()
        if tenant_id is None:
            return Run.objects.none()
        runs = runs.filter(tenant_id=tenant_id)
    if filters.workflow:
        versions = WorkflowVersion.objects.filter(workflow__name=filters.workflow)
        if tenant_id is not None:
            versions = versions.filter(workflow__tenant_id=tenant_id)
        version_ids = list(versions.values_list("id", flat=True))
        if not version_ids:
            return Run.objects.none()
        runs = runs.filter(workflow_version_id__in=version_ids)
    if filters.status:
        runs = runs.filter(status=filters.status)
    if filters.lane:
        runs = runs.filter(lane=filters.lane)
    if filters.since:
        runs = runs.filter(created_at__gte=filters.since)
    if filters.until:
        runs = runs.filter(created_at__lt=filters.until)
    if filters.error:
        runs = runs.filter(error__icontains=filters.error)
    if filters.fingerprint:
        expression = RawSQL(FINGERPRINT_SQL.format(col='"jobs_run"."error"'), [])
        runs = runs.annotate(fingerprint=expression).filter(fingerprint=filters.fingerprint)
    return runs


@dataclass(frozen=True)
class RunsPage:
    runs: list[Run]
    older: str | None  # public id to pass as ?after= for the next (older) page
    newer: str | None  # public id to pass as ?before= for the previous (newer) page
    elapsed_ms: float


def runs_page(
    filters: RunFilters,
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = RUNS_PAGE,
) -> RunsPage:
    """One page of runs, newest first, by keyset on (created_at, id).

    `after` / `before` are the public ids of the last / first run of the page the operator
    comes from; the query starts from that run's position, so every page costs the same
    however deep it is. No total count: counting a million rows is what makes lists slow.
    """
    started = time.monotonic()
    runs = runs_matching(filters).select_related("tenant", "workflow_version__workflow")
    anchor = _anchor(after or before)
    if anchor is not None and after:
        runs = runs.filter(created_at__lte=anchor[0]).exclude(
            created_at=anchor[0], id__gte=anchor[1]
        )
        rows = list(runs.order_by("-created_at", "-id")[: limit + 1])
        has_older, has_newer = len(rows) > limit, True
        rows = rows[:limit]
    elif anchor is not None and before:
        runs = runs.filter(created_at__gte=anchor[0]).exclude(
            created_at=anchor[0], id__lte=anchor[1]
        )
        rows = list(runs.order_by("created_at", "id")[: limit + 1])
        has_older, has_newer = True, len(rows) > limit
        rows = list(reversed(rows[:limit]))
    else:
        rows = list(runs.order_by("-created_at", "-id")[: limit + 1])
        has_older, has_newer = len(rows) > limit, False
        rows = rows[:limit]
    return RunsPage(
        runs=rows,
        older=str(rows[-1].public_id) if rows and has_older else None,
        newer=str(rows[0].public_id) if rows and has_newer else None,
        elapsed_ms=round((time.monotonic() - started) * 1000, 1),
    )


def _anchor(public_id: str | None) -> tuple[datetime, int] | None:
    if not public_id:
        return None
    try:
        parsed = uuid.UUID(str(public_id))
    except ValueError:
        return None
    return Run.objects.filter(public_id=parsed).values_list("created_at", "id").first()


def runs_count(filters: RunFilters, *, action_filter: Q, cap: int) -> int:
    """How many runs a bulk action would touch, counted up to `cap` + 1."""
    return runs_matching(filters).filter(action_filter)[: cap + 1].count()


def runs_for_bulk(filters: RunFilters, *, action_filter: Q, cap: int) -> list[Run]:
    return list(runs_matching(filters).filter(action_filter).order_by("-created_at", "-id")[:cap])


def run_by_public_id(run_id: str) -> Run | None:
    try:
        public_id = uuid.UUID(str(run_id))
    except ValueError:
        return None
    return (
        Run.objects.select_related("tenant", "workflow_version__workflow", "parent_step__run")
        .filter(public_id=public_id)
        .first()
    )


# --- one run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepDetail:
    step: StepRun
    input: str
    output: str
    attempts: list[StepAttempt]
    # A map's own row: how many of its items are done, of how many. That row never runs on
    # a worker (its items do), so it has no attempts to count.
    items_done: int | None = None
    items_total: int | None = None


def _shown(value: Any) -> str:
    if value is None:
        return ""
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)
    if len(text) > JSON_SHOWN:
        return text[:JSON_SHOWN] + f"\n… cut: {len(text):,} characters in all"
    return text


def _step_detail(step: StepRun, map_items: list[StepRun]) -> StepDetail:
    detail = StepDetail(step, _shown(step.input), _shown(step.output), list(step.attempts.all()))
    if step.kind == "map" and step.map_index is None:
        return replace(detail, items_done=map_items_done(map_items), items_total=len(map_items))
    return detail


def run_detail(run: Run) -> dict[str, Any]:
    """What the run page shows: steps with attempts, graph, timeline, latest events."""
    steps = list(StepRun.objects.filter(run=run).prefetch_related("attempts").order_by("id"))
    events = list(Event.objects.filter(run=run).order_by("-seq")[:EVENTS_SHOWN])
    events.reverse()
    definition = definition_of(run.workflow_version)
    shown, per_map = [], defaultdict(int)
    items = items_by_map(steps)
    for step in steps:
        if step.map_index is not None and step.status != StepStatus.FAILED:
            per_map[step.step_id] += 1
            if per_map[step.step_id] > MAP_ITEMS_SHOWN:
                continue
        shown.append(step)
    return {
        "steps": [_step_detail(step, items.get(step.step_id, [])) for step in shown],
        "steps_hidden": len(steps) - len(shown),
        "graph": run_graph(run, steps),
        "gantt": run_gantt(run, steps),
        "events": events,
        "events_cut": bool(events) and events[0].seq > 1,
        "step_ids": [step.id for step in definition.steps],
        "child_runs": list(
            Run.objects.filter(parent_step__run=run).values_list("public_id", "status")
        ),
        "is_final": run.status in RUN_FINAL,
        "agents": _agents_shown(steps),
    }


def _agents_shown(steps: list[StepRun]) -> list[dict[str, Any]]:
    """Each agent's transcript as the run page shows it: a conversation, one turn after the
    other, with each tool call's arguments and result as indented JSON to fold out."""
    shown = []
    for step_id, turns in agent_transcripts(steps).items():
        for turn in turns:
            for call in turn["tool_calls"]:
                call["args_json"] = json.dumps(call.get("args"), indent=2, ensure_ascii=False)
                if "result" in call:
                    call["result_json"] = json.dumps(call["result"], indent=2, ensure_ascii=False)
                edited = (call.get("approval") or {}).get("edited_args")
                if edited is not None:
                    call["edited_json"] = json.dumps(edited, indent=2, ensure_ascii=False)
        tokens = sum(int(turn["usage"].get("total_tokens") or 0) for turn in turns)
        shown.append({"step_id": step_id, "turns": turns, "tokens": tokens})
    return shown


# --- failures -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureGroup:
    tenant: str
    workflow: str
    fingerprint: str
    count: int
    last_at: datetime
    first_at: datetime
    sample_error: str
    sample_run: uuid.UUID


# When a run failed: the failure stamps `finished_at` (`updated_at` is for a row without it).
_FAILED_AT = "coalesce(r.finished_at, r.updated_at)"

_FAILURES = f"""
SELECT t.slug, w.name, {FINGERPRINT_SQL.format(col="r.error")} AS fp, count(*),
       max({_FAILED_AT}), min({_FAILED_AT}),
       (array_agg(r.error ORDER BY {_FAILED_AT} DESC))[1],
       (array_agg(r.public_id ORDER BY {_FAILED_AT} DESC))[1]
FROM jobs_run r
JOIN tenants_tenant t ON t.id = r.tenant_id
JOIN jobs_workflowversion v ON v.id = r.workflow_version_id
JOIN jobs_workflow w ON w.id = v.workflow_id
WHERE r.status = 'failed' AND r.created_at >= %s
GROUP BY 1, 2, 3
ORDER BY 4 DESC, 5 DESC
LIMIT %s
"""


def failure_groups(*, since: datetime, limit: int = 100) -> list[FailureGroup]:
    """Failed runs created since `since`, grouped by tenant, workflow and error fingerprint,
    each group with its first and last failure times and its latest failure's error and run."""
    with connection.cursor() as cursor:
        cursor.execute(_FAILURES, [since, limit])
        return [FailureGroup(*row) for row in cursor.fetchall()]
