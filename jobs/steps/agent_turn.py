"""One turn of an agent, as the `llm` handler runs it: what the model is told of the tools,
the loop's deadline, the simulated provider's script, and the check of the tool calls the
model made.

A turn's output is its checkpoint: the model's text, each tool call as
`{"id", "name", "tool", "arguments", "args", "error"?}` (`error` when the call names no tool of
the agent or its arguments are not JSON or do not match the tool's schema: the call then does
not run and the error is its result), the token usage, and `agent_deadline`, which the next
turn inherits. The provider's call itself is `jobs.steps.llm`'s.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone
from jsonschema import Draft202012Validator

from jobs.formats import iso
from jobs.models import WorkflowVersion
from jobs.steps import agent, registry
from jobs.steps.registry import StepContext, StepFailure, ToolSpec
from tenants.models import Tenant
from tenants.quotas import llm_tokens_used, usage_day

RETRIEVAL_SPEC = ToolSpec(
    name=agent.RETRIEVAL_TOOL,
    description="Search this organisation's documents by keywords; returns the best matches.",
    schema={
        "type": "object",
        "required": ["query"],
        "additionalProperties": False,
        "properties": {
            "query": {"type": "string", "minLength": 1, "description": "what to look for"},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 20},
        },
    },
)


def deadline(ctx: StepContext) -> datetime | None:
    """The loop's deadline: inherited from the previous turn, or set by turn 1 from the
    agent's `timeout_s`; the turn fails for good once it has passed."""
    inherited = ctx.input.get("agent_deadline")
    if inherited:
        when = datetime.fromisoformat(inherited)
    elif ctx.input.get("agent_timeout_s"):
        when = timezone.now() + timedelta(seconds=float(ctx.input["agent_timeout_s"]))
    else:
        return None
    if timezone.now() > when:
        raise StepFailure(
            f"the agent's timeout of {ctx.input.get('agent_timeout_s', '?')} s passed "
            f"before turn {ctx.input['agent_turn']}",
            code="agent_timeout",
            retryable=False,
        )
    return when


def tool_specs(tenant_id: int, tools: list[str]) -> dict[str, ToolSpec]:
    """What the model is told of each of the agent's tools, by the name it calls them."""
    specs: dict[str, ToolSpec] = {}
    for tool in tools:
        if tool == agent.RETRIEVAL_TOOL:
            spec = RETRIEVAL_SPEC
        elif tool.startswith(agent.WORKFLOW_PREFIX):
            spec = _workflow_spec(tenant_id, tool)
        else:
            try:
                spec = registry.tool_spec(tool)
            except KeyError:
                raise StepFailure(
                    f"unknown tool {tool!r}", code="unknown_tool", retryable=False
                ) from None
        specs[agent.function_name(tool)] = ToolSpec(tool, spec.description, spec.schema)
    return specs


def _workflow_spec(tenant_id: int, tool: str) -> ToolSpec:
    """A workflow as a tool: its description, and its input schema as the arguments'."""
    name = tool[len(agent.WORKFLOW_PREFIX) :]
    version = (
        WorkflowVersion.objects.filter(workflow__tenant_id=tenant_id, workflow__name=name)
        .order_by("-version")
        .values_list("definition", flat=True)
        .first()
    )
    if version is None:
        return ToolSpec(tool, f"Run the workflow {name!r} (it does not exist yet).")
    description = version.get("description") or f"Run the workflow {name!r}."
    schema = version.get("input_schema") or dict(registry.ANY_ARGUMENTS)
    return ToolSpec(tool, description, schema)


def openai_tools(specs: dict[str, ToolSpec]) -> list[dict[str, Any]]:
    """The tools in the chat-completions wire format."""
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": spec.description or spec.name,
                "parameters": spec.schema,
            },
        }
        for name, spec in specs.items()
    ]


def checked_calls(specs: dict[str, ToolSpec], calls: list[dict[str, str]]) -> list[dict]:
    """The model's tool calls as checkpointed: each with its tool and parsed arguments, or
    the error that keeps it from running (the model reads it as the call's result)."""
    checked = []
    for position, call in enumerate(calls):
        name, text = call.get("name") or "", call.get("arguments") or ""
        entry: dict[str, Any] = {
            "id": call.get("id") or f"call_{position}",
            "name": name,
            "tool": name,
            "arguments": text,
            "args": None,
        }
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(sorted(specs)) or "none"
            entry["error"] = f"there is no tool named {name!r}; the tools are: {known}"
        else:
            entry["tool"] = spec.name
            entry.update(_parsed_arguments(spec, text))
        checked.append(entry)
    return checked


def _parsed_arguments(spec: ToolSpec, text: str) -> dict[str, Any]:
    try:
        args = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        return {"error": f"the arguments of {spec.name} are not JSON: {exc}"}
    if not isinstance(args, dict):
        return {"error": f"the arguments of {spec.name} must be a JSON object"}
    problem = schema_problem(spec.schema, args)
    if problem is not None:
        return {"args": args, "error": f"the arguments of {spec.name} do not match: {problem}"}
    return {"args": args}


def schema_problem(schema: dict[str, Any], value: Any) -> str | None:
    """The first way `value` fails `schema` ("args.url: 'url' is a required property"), or
    None."""
    errors = sorted(Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.path))
    if not errors:
        return None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in errors[0].path)
    return f"args{where}: {errors[0].message}"


def scripted_reply(ctx: StepContext) -> dict[str, Any] | None:
    """Turn n of the simulated provider's script (None past its end): the text and the tool
    calls, in the wire format's shape (arguments as JSON text)."""
    script = (ctx.input.get("simulated") or {}).get("script") or []
    number = int(ctx.input["agent_turn"])
    if number > len(script):
        return None
    turn = script[number - 1]
    calls = [
        {
            "id": call.get("id") or f"call_{number}_{position + 1}",
            "name": agent.function_name(call["tool"]),
            "arguments": json.dumps(call.get("args", {}), ensure_ascii=False),
        }
        for position, call in enumerate(turn.get("tool_calls", []))
    ]
    return {"text": turn.get("text", ""), "tool_calls": calls, "usage": turn.get("usage")}


def checkpoint(
    ctx: StepContext, reply: dict[str, Any], specs: dict[str, ToolSpec], until: datetime | None
) -> dict[str, Any]:
    """The turn's output (see the module docstring)."""
    output = dict(reply)
    output["turn"] = int(ctx.input["agent_turn"])
    output["tool_calls"] = checked_calls(specs, reply.get("tool_calls") or [])
    gated = set(ctx.input.get("approve_tools") or [])
    for call in output["tool_calls"]:
        if call["tool"] in gated and not call.get("error"):
            # Reviewers edit the arguments against the tool's schema (jobs.steps.agent).
            call["approval"] = True
            call["schema"] = specs[agent.function_name(call["tool"])].schema
    if until is not None:
        output["agent_deadline"] = iso(until)
    if output["tool_calls"]:
        spent = daily_budget_spent(ctx, output)
        if spent:
            output["daily_budget_spent"] = spent
    return output


def daily_budget_spent(ctx: StepContext, output: dict[str, Any]) -> str | None:
    """Why the loop cannot go on when the tenant's LLM tokens for today, this turn's
    included, have reached its daily budget: the next turn would be held until tomorrow, so
    the agent ends now with this error (the turn itself is kept and its tokens counted)."""
    tenant = Tenant.objects.only("llm_tokens_per_day").get(pk=ctx.tenant_id)
    day = usage_day(timezone.now())
    used = llm_tokens_used([ctx.tenant_id], day=day).get(ctx.tenant_id, 0)
    used += int((output.get("usage") or {}).get("total_tokens") or 0)
    if used < tenant.llm_tokens_per_day:
        return None
    return (
        f"the tenant's daily budget of {tenant.llm_tokens_per_day} LLM tokens is spent "
        f"({used} used on {day.isoformat()}, UTC) while turn {ctx.input['agent_turn']} still "
        "calls tools"
    )
