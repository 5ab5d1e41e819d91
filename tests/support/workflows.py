"""Small helpers to define workflows and submit runs in tests (through the services)."""

from __future__ import annotations

from typing import Any

from jobs.models import Event, Run
from jobs.services.runs import run_create
from jobs.services.workflows import workflow_version_create


def submit(
    tenant, definition: dict[str, Any], input: dict[str, Any] | None = None, **kwargs
) -> Run:
    version = workflow_version_create(tenant=tenant, document=definition)
    return run_create(tenant=tenant, version=version, input=input or {}, **kwargs)


def tool_step(step_id: str, tool: str, **fields) -> dict[str, Any]:
    args = fields.pop("args", {})
    return {"id": step_id, "kind": "tool", "tool": tool, "args": args, **fields}


def event_types(run: Run) -> list[str]:
    return list(Event.objects.filter(run=run).order_by("seq").values_list("type", flat=True))


def assert_gapless(run: Run) -> None:
    seqs = list(Event.objects.filter(run=run).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1)), f"event seqs have gaps: {seqs}"
