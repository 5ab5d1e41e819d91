"""The workflows and tenants the scenarios run.

The agent workflow of the motivating scenario: 3 LLM calls, 2 tool calls and
1 retrieval in sequence, the way a support agent works a ticket (search, classify, look up the
account, draft, check the policy, reply). Its simulated latencies sum to `AGENT_LATENCY_MS`
(20 s) before scaling; the retrieval is the real PostgreSQL full-text search of `retrieval`
steps (milliseconds), over documents the bench stores for the tenant.
"""

from __future__ import annotations

from typing import Any

# Unscaled simulated latencies of the agent workflow (ms); they sum to 20 s.
AGENT_STEPS: list[tuple[str, str, float]] = [
    ("search", "retrieval", 0),
    ("classify", "llm", 4_000),
    ("account", "tool", 2_500),
    ("draft", "llm", 7_000),
    ("policy", "tool", 2_500),
    ("reply", "llm", 4_000),
]
AGENT_LATENCY_MS = sum(latency for _, _, latency in AGENT_STEPS)

DOCUMENTS = [
    {"title": "Refund policy", "text": "Refunds are granted within 30 days of an invoice."},
    {"title": "Shipping", "text": "Orders ship within two business days; tracking by email."},
    {"title": "Accounts", "text": "Account emails can be changed in the settings page."},
    {"title": "Invoices", "text": "Invoices are sent monthly; a refund appears on the next one."},
]


def agent_workflow(scale: float, name: str = "agent") -> dict[str, Any]:
    """The agent workflow with every latency multiplied by `scale` (e.g. 1/10)."""
    steps: list[dict[str, Any]] = []
    previous: str | None = None
    for step_id, kind, latency_ms in AGENT_STEPS:
        step: dict[str, Any] = {"id": step_id, "kind": kind}
        if kind == "llm":
            step["prompt"] = f"{step_id}: {{{{ input.ticket }}}}"
            step["provider"] = "simulated"
            step["simulated"] = {"latency_ms": round(latency_ms * scale, 3)}
        elif kind == "tool":
            step["tool"] = "echo"
            step["args"] = {"ticket": "{{ input.ticket }}", "delay_ms": latency_ms * scale}
        else:
            step["query"] = "{{ input.ticket }}"
            step["top_k"] = 3
        if previous:
            step["after"] = [previous]
        steps.append(step)
        previous = step_id
    return {
        "name": name,
        "input_schema": {
            "type": "object",
            "required": ["ticket"],
            "properties": {"ticket": {"type": "string"}},
        },
        "steps": steps,
        "output": "{{ steps.reply.output.text }}",
    }


def chain_workflow(steps: int, latency_ms: float = 0, name: str | None = None) -> dict[str, Any]:
    """`steps` simulated LLM steps, each after the previous one."""
    return {
        "name": name or f"chain-{steps}-{latency_ms:g}ms",
        "steps": [
            {
                "id": f"s{i}",
                "kind": "llm",
                "provider": "simulated",
                "prompt": f"step {i}",
                "simulated": {"latency_ms": latency_ms},
                **({"after": [f"s{i - 1}"]} if i else {}),
            }
            for i in range(steps)
        ],
    }


def fan_workflow(width: int, latency_ms: float = 0, name: str | None = None) -> dict[str, Any]:
    """`width` independent simulated LLM steps (they are all ready at once)."""
    return {
        "name": name or f"fan-{width}-{latency_ms:g}ms",
        "steps": [
            {
                "id": f"s{i}",
                "kind": "llm",
                "provider": "simulated",
                "prompt": f"item {i}",
                "simulated": {"latency_ms": latency_ms},
            }
            for i in range(width)
        ],
    }


def bench_tenant(slug: str, *, weight: int = 1, lane: str = "standard"):
    """A tenant whose quotas do not bind (the bench measures the engine, not the quotas).

    Returns (tenant, raw API key).
    """
    from tenants.models import Tenant
    from tenants.services import tenant_create

    tenant, issued = tenant_create(slug=slug, weight=weight)
    Tenant.objects.filter(pk=tenant.pk).update(
        default_lane=lane,
        max_concurrent_steps=100_000,
        max_active_runs=1_000_000,
        max_queued_runs=1_000_000,
        steps_per_minute=10_000_000,
        llm_tokens_per_day=10**15,
    )
    tenant.refresh_from_db()
    return tenant, issued.raw_key


def install(tenant, document: dict[str, Any]):
    from jobs.services.workflows import workflow_version_create

    return workflow_version_create(tenant=tenant, document=document)
