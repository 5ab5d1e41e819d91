"""The registry of step kinds and tools.

A step kind is a name (used in definitions), the broker queue its steps run on, the JSON
Schema of the fields a step of that kind may carry besides the common ones (id, kind, after,
when, retry, timeout_s, optional), and a handler. Built-in kinds are declared here; a project
adds kinds with `register_kind` and tools with `register_tool` in a module listed in the
`SWITCHYARD_PLUGINS` setting (imported when the `jobs` app is ready).

Handlers are referenced by dotted path and imported lazily, so the definition language can
validate against the registry without importing HTTP clients or the ORM.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from approvals import kind as approval
from jobs.steps import agent

# Queues. The scheduler's own work (child runs, approval requests) runs on `steps.control`.
QUEUE_LLM = "steps.llm"
QUEUE_TOOL = "steps.tool"
QUEUE_RETRIEVAL = "steps.retrieval"
QUEUE_CONTROL = "steps.control"
QUEUES = (QUEUE_LLM, QUEUE_TOOL, QUEUE_RETRIEVAL, QUEUE_CONTROL)


class StepFailure(Exception):
    """Raised by a handler when an attempt fails.

    `code` is a short machine-readable name (`timeout`, `http_error`, `provider_error`, ...)
    that a step's `retry.non_retryable` list can name; `retryable=False` fails the step at once
    whatever its retry policy says (bad arguments, a 4xx from a provider, ...).
    """

    def __init__(self, message: str, *, code: str = "error", retryable: bool = True):
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable


@dataclass(frozen=True)
class StepContext:
    """What a handler gets for one attempt of one step.

    `input` is the step's configuration with every template already rendered (native types).
    `idempotency_key` (`<run id>:<step id>[<map index>]`) is stable across attempts: pass it to
    external systems so that a retried attempt does not repeat a side effect.
    `deadline` is when the attempt's lease ends; a handler must give up before it.
    `emit_delta` sends ephemeral progress (LLM token deltas); it never raises.
    """

    run_id: str
    tenant_id: int
    step_id: str
    map_index: int | None
    kind: str
    attempt: int
    input: dict[str, Any]
    idempotency_key: str
    deadline: datetime
    emit_delta: Callable[[str], None] = field(default=lambda text: None)

    def seconds_left(self) -> float:
        from django.utils import timezone

        return max(0.0, (self.deadline - timezone.now()).total_seconds())


@dataclass(frozen=True)
class KindSpec:
    name: str
    queue: str
    # JSON Schema (object) of the kind-specific fields of a step; `required` is honoured and
    # unknown fields are refused.
    config_schema: dict[str, Any]
    # Dotted path of `handler(ctx: StepContext) -> Any`; None for kinds the engine runs itself
    # (`map`) or that have a dedicated service (`workflow`).
    handler: str | None
    # Fields whose string values are templates rendered at readiness ("args" renders
    # recursively). Fields not listed are passed through as written.
    template_fields: tuple[str, ...] = ()
    # Dotted path of `check(step: dict) -> list[tuple[str, str]]`, the rules of the kind that
    # JSON Schema cannot state, as (path within the step, message); run at upload. Pure.
    check: str | None = None
    # True when `timeout_s` of a step of this kind is how long it may wait (an approval's
    # decision deadline) rather than how long an attempt may run; its attempts then get the
    # default attempt timeout (SWITCHYARD_STEP_DEFAULT_TIMEOUT_S).
    timeout_is_deadline: bool = False
    # Dotted path of `on_cancel(*, txn, step, reason)`, for kinds whose steps wait on something
    # outside the run (people): called in the transaction that cancels such a step, to
    # withdraw what it waits on.
    on_cancel: str | None = None

    def load_handler(self) -> Callable[[StepContext], Any]:
        if self.handler is None:
            raise LookupError(f"kind {self.name!r} has no handler")
        return _load(self.handler)

    def load_on_cancel(self) -> Callable[..., Any] | None:
        return None if self.on_cancel is None else _load(self.on_cancel)

    def load_check(self) -> Callable[[dict[str, Any]], list[tuple[str, str]]] | None:
        return None if self.check is None else _load(self.check)


def _load(dotted_path: str) -> Any:
    module_name, _, attr = dotted_path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


_SIMULATED_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "latency_ms": {"type": "number", "minimum": 0, "maximum": 3_600_000},
        "jitter_ms": {"type": "number", "minimum": 0, "maximum": 3_600_000},
        "distribution": {"enum": ["uniform", "normal", "lognormal"]},
        "fail_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "response": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "tokens_per_second": {"type": "number", "exclusiveMinimum": 0},
    },
}

_BUILTIN_KINDS: dict[str, KindSpec] = {
    "llm": KindSpec(
        name="llm",
        queue=QUEUE_LLM,
        handler="jobs.steps.llm.handle",
        template_fields=("prompt", "system"),
        config_schema={
            "type": "object",
            "additionalProperties": False,
            "required": ["prompt"],
            "properties": {
                "prompt": {"type": "string", "minLength": 1},
                "system": {"type": "string"},
                "provider": {"enum": ["simulated", "openai"]},
                "model": {"type": "string", "minLength": 1},
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "max_tokens": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                "simulated": _SIMULATED_SCHEMA,
            },
        },
    ),
    "tool": KindSpec(
        name="tool",
        queue=QUEUE_TOOL,
        handler="jobs.steps.tools.handle",
        template_fields=("args",),
        config_schema={
            "type": "object",
            "additionalProperties": False,
            "required": ["tool"],
            "properties": {
                "tool": {"type": "string", "minLength": 1},
                "args": {"type": "object"},
            },
        },
    ),
    "retrieval": KindSpec(
        name="retrieval",
        queue=QUEUE_RETRIEVAL,
        handler="jobs.steps.retrieval.handle",
        template_fields=("query",),
        config_schema={
            "type": "object",
            "additionalProperties": False,
            "required": ["query"],
            "properties": {
                "query": {"type": "string", "minLength": 1},
                "top_k": {"type": "integer", "minimum": 1, "maximum": 100},
                "match": {"enum": ["any", "all"]},
            },
        },
    ),
    "workflow": KindSpec(
        name="workflow",
        queue=QUEUE_CONTROL,
        handler=None,
        template_fields=("input",),
        config_schema={
            "type": "object",
            "additionalProperties": False,
            "required": ["workflow"],
            "properties": {
                "workflow": {"type": "string", "minLength": 1},
                "version": {"type": "integer", "minimum": 1},
                "input": {"type": "object"},
            },
        },
    ),
    # Parks in `waiting` until people decide (approvals.services; docs/approvals.md).
    "approval": KindSpec(
        name="approval",
        queue=QUEUE_CONTROL,
        handler=None,
        template_fields=approval.TEMPLATE_FIELDS,
        config_schema=approval.CONFIG_SCHEMA,
        check="approvals.kind.check",
        timeout_is_deadline=True,
        on_cancel="approvals.services.approvals_cancel_for_step",
    ),
    # Waits while its turns and tool calls run as its children (jobs.steps.agent).
    "agent": KindSpec(
        name="agent",
        queue=QUEUE_CONTROL,
        handler=None,
        template_fields=agent.TEMPLATE_FIELDS,
        config_schema=agent.CONFIG_SCHEMA,
        check="jobs.steps.agent_check.check",
        timeout_is_deadline=True,
    ),
    "map": KindSpec(
        name="map",
        queue=QUEUE_CONTROL,
        handler=None,
        template_fields=("over",),
        config_schema={
            "type": "object",
            "additionalProperties": False,
            "required": ["over", "step"],
            "properties": {
                "over": {"type": "string", "minLength": 1},
                "step": {"type": "object"},
                "max_parallel": {"type": "integer", "minimum": 1, "maximum": 1000},
            },
        },
    ),
}

_kinds: dict[str, KindSpec] = dict(_BUILTIN_KINDS)
_tools: dict[str, Callable[..., Any]] = {}
_tool_specs: dict[str, ToolSpec] = {}


def register_kind(spec: KindSpec) -> None:
    _kinds[spec.name] = spec


def kinds() -> dict[str, KindSpec]:
    return dict(_kinds)


def kind(name: str) -> KindSpec:
    return _kinds[name]


# What an agent's model is told of a tool that declares no schema: any object of arguments.
ANY_ARGUMENTS: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolSpec:
    """What a model is told about a tool: what it does and the JSON Schema of its arguments
    (an object), against which an agent checks the arguments a model gives before the call."""

    name: str
    description: str = ""
    schema: dict[str, Any] = field(default_factory=lambda: dict(ANY_ARGUMENTS))


def register_tool(
    name: str, *, description: str = "", schema: dict[str, Any] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: `@register_tool("crm.lookup", description=..., schema=...)` on
    `def lookup(ctx: StepContext, **args)`. `description` defaults to the function's
    docstring; `schema` (the arguments' JSON Schema) to any object."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        _tools[name] = func
        text = description or (func.__doc__ or "").strip().split("\n\n")[0]
        _tool_specs[name] = ToolSpec(
            name=name,
            description=" ".join(text.split()),
            schema=dict(schema) if schema is not None else dict(ANY_ARGUMENTS),
        )
        return func

    return decorate


def tool_spec(name: str) -> ToolSpec:
    return _tool_specs[name]


def tools() -> dict[str, Callable[..., Any]]:
    return dict(_tools)


def tool(name: str) -> Callable[..., Any]:
    return _tools[name]
