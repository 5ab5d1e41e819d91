"""Agent workflows for tests, and a driver that runs a run's steps in this process."""

from __future__ import annotations

import json
from typing import Any

from jobs.execution import step_execute
from jobs.models import Run, StepRun, StepStatus
from tests.support.workflows import dispatch_token_of

SCRIPT = [
    {
        "text": "Let me look up the order and the policy.",
        "tool_calls": [
            {"tool": "test.count", "args": {"key": "order-7"}},
            {"tool": "retrieval", "args": {"query": "refund policy"}},
        ],
    },
    {"text": "", "tool_calls": [{"tool": "echo", "args": {"refund": 120}}]},
    {"text": '{"refund": true, "amount": 120}'},
]


def support_agent(name: str = "support-agent", **fields: Any) -> dict[str, Any]:
    step = {
        "id": "helper",
        "kind": "agent",
        "provider": "simulated",
        "system": "You are a support agent.",
        "prompt": "Customer asks about order {{ input.order }}",
        "tools": ["test.count", "retrieval", "echo"],
        "max_turns": 5,
        "simulated": {"latency_ms": 0, "script": SCRIPT},
        **fields,
    }
    return {"name": name, "steps": [step], "output": "{{ steps.helper.output }}"}


def drive(run: Run, *, limit: int = 50) -> Run:
    """Claim and run every ready or queued step of `run` (and of its child runs) until none
    is left, as the scheduler and workers would; returns the run as it ends."""
    for _ in range(limit):
        steps = list(
            StepRun.objects.filter(
                run__in=[run, *Run.objects.filter(parent_step__run=run)],
                status__in=[StepStatus.READY, StepStatus.QUEUED],
            )
            .exclude(kind__in=["map", "agent"])
            .order_by("id")
        )
        if not steps:
            break
        for step in steps:
            token = dispatch_token_of(step)
            step_execute(step_run_id=step.pk, dispatch_token=token, worker="local@test/1")
    run.refresh_from_db()
    return run


def children(run: Run) -> list[StepRun]:
    return list(StepRun.objects.filter(run=run, step_id="helper").exclude(map_index=None))


def refund_agent() -> dict[str, Any]:
    """An agent that calls echo, then test.refund, which needs a reviewer's approval."""
    script = [
        {
            "text": "The order arrived broken; I will refund it.",
            "tool_calls": [
                {"tool": "echo", "args": {"order": 7}},
                {"tool": "test.refund", "args": {"order": 7, "amount": 120}},
            ],
        },
        {"text": "Done."},
    ]
    return {
        "name": "refund-agent",
        "steps": [
            {
                "id": "helper",
                "kind": "agent",
                "provider": "simulated",
                "prompt": "Order 7 arrived broken.",
                "tools": ["echo", "test.refund"],
                "approve_tools": ["test.refund"],
                "max_turns": 3,
                "simulated": {"latency_ms": 0, "script": script},
            }
        ],
        "output": "{{ steps.helper.output.text }}",
    }


def model_was_told(run: Run) -> Any:
    """The last message the agent's last turn was given: the result of the last call."""
    last_turn = [s for s in children(run) if s.kind == "llm"][-1]
    return json.loads(last_turn.input["messages"][-1]["content"])
