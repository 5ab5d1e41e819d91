"""Small helpers to define workflows and submit runs in tests (through the services)."""

from __future__ import annotations

from typing import Any

from jobs.models import Event, Run, StepStatus
from jobs.services.workflows import workflow_version_create
from jobs.transitions.runs import run_create
from jobs.transitions.steps import step_admit


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


def chain_and_map(name: str = "chain-and-map", *, latency_ms: int = 125) -> dict[str, Any]:
    """Two chained LLM steps (simulated, `latency_ms` ± 60 %), an echo tool step, a map of an
    LLM step over the input's `items`, and an echo after all of them. The map depends on
    nothing, so each run's own map row is `running` (waiting for its items, on no worker) from
    the moment the run is accepted. Submit with `{"items": [...]}`."""
    simulated = {"provider": "simulated", "simulated": {"latency_ms": latency_ms}}
    simulated["simulated"]["jitter_ms"] = round(latency_ms * 0.6)
    return {
        "name": name,
        "input_schema": {"type": "object", "required": ["items"]},
        "steps": [
            {"id": "draft", "kind": "llm", "prompt": "Draft {{ input['items'] }}", **simulated},
            {
                "id": "refine",
                "kind": "llm",
                "prompt": "Refine: {{ steps.draft.output.text }}",
                "after": ["draft"],
                **simulated,
            },
            tool_step("lookup", "echo", args={"items": "{{ input['items'] }}"}),
            {
                "id": "each",
                "kind": "map",
                "over": "{{ input['items'] }}",
                "step": {"kind": "llm", "prompt": "Item {{ item }}", **simulated},
            },
            tool_step(
                "finish",
                "echo",
                after=["refine", "lookup", "each"],
                args={"items": "{{ steps.each.output | length }}"},
            ),
        ],
        "output": "{{ steps.finish.output.args['items'] }}",
    }


def dispatch_token_of(step) -> str:
    """The dispatch token a worker's message would carry for `step`: the scheduler's admission
    of it if it is still ready, else the one its direct admission gave it (on by default)."""
    step.refresh_from_db()
    if step.status == StepStatus.READY:
        return str(step_admit(step_run_id=step.pk).dispatch_token)
    return str(step.dispatch_token)
