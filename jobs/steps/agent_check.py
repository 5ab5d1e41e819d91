"""The upload checks of an `agent` step that JSON Schema cannot state (the kind's `check`).

Apart from `jobs.steps.agent` because it reads the registry of tools, which imports that
module for the kind's schema. Pure Python.
"""

from __future__ import annotations

import re
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from jobs.steps import registry
from jobs.steps.agent import RETRIEVAL_TOOL, WORKFLOW_NAME_PATTERN, WORKFLOW_PREFIX, function_name


def check(step: dict[str, Any]) -> list[tuple[str, str]]:
    """Faults of an agent step that its JSON Schema cannot express (tools that do not exist,
    a bad output schema, tools to approve that the agent does not have)."""
    faults: list[tuple[str, str]] = []
    known = frozenset(registry.tools())
    tools = step.get("tools", [])
    names: dict[str, str] = {}
    for index, tool in enumerate(tools):
        path = f"tools[{index}]"
        if tool.startswith(WORKFLOW_PREFIX):
            if not re.match(WORKFLOW_NAME_PATTERN, tool[len(WORKFLOW_PREFIX) :]):
                faults.append((path, f"'{tool}' does not name a workflow (workflow:<name>)"))
        elif tool != RETRIEVAL_TOOL and tool not in known:
            listed = ", ".join(sorted(known | {RETRIEVAL_TOOL})) or "none"
            faults.append(
                (
                    path,
                    f"unknown tool '{tool}'; tools are registered tools ({listed}) "
                    "or workflow:<name>",
                )
            )
        other = names.setdefault(function_name(tool), tool)
        if other != tool:
            faults.append((path, f"'{tool}' and '{other}' reach the model under one name"))
    for index, tool in enumerate(step.get("approve_tools", [])):
        if tool not in tools:
            faults.append((f"approve_tools[{index}]", f"'{tool}' is not one of the agent's tools"))
    schema = step.get("output_schema")
    if isinstance(schema, dict):
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            faults.append(("output_schema", f"is not a valid JSON Schema: {exc.message}"))
    script = (step.get("simulated") or {}).get("script") or []
    for number, turn in enumerate(script):
        for index, call in enumerate(turn.get("tool_calls", [])):
            if call["tool"] not in tools:
                faults.append(
                    (
                        f"simulated.script[{number}].tool_calls[{index}].tool",
                        f"'{call['tool']}' is not one of the agent's tools",
                    )
                )
    return faults
