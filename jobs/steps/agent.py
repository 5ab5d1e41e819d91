"""The `agent` step kind: a tool-calling loop whose turns and tool calls are child steps.

An agent step never runs on a worker. When it starts, it waits (`waiting`, holding no worker
and no quota slot) while its children run; the engine reads their checkpoints and decides the
next move with `progress` below, the way it reads a map's items:

- child 0 is turn 1, an `llm` step on `steps.llm` whose input is the whole conversation so far
  (`messages`) and the tools' names; its output is the model's reply (text, tool calls with
  their arguments checked against each tool's schema, token usage);
- each tool call of a turn whose arguments are valid is the next child: a `tool`,
  `retrieval` or `workflow` step on that kind's queue, admitted like any other step; the
  calls of one turn are made ready together, so they run in parallel;
- when every call of turn n is final, the next child is turn n + 1, whose messages end with
  the calls' results (a failed call's error is its result: the model decides what to do).

Children are numbered in that order (`map_index` 0, 1, 2, ...), so the numbering follows from
the checkpoints alone: a transition that runs twice, or after a crash, finds the same children
and never creates one twice. The loop ends when a turn asks for no tool (its text, or its JSON
checked against `output_schema`, is the output), or fails with a clear error at `max_turns`,
past `max_tokens`, past `timeout_s` (checked by each turn before it calls the model) or when a
turn fails for good.

Tools (`tools`): a registered Python tool by name (`echo`, `http`, a plugin's), `retrieval`
(a search of the tenant's documents) or `workflow:<name>` (a run of the tenant's workflow, as
a child run). Tools named in `approve_tools` wait for a reviewer's decision before they run.

Pure Python (no Django): the engine and the definition validator import it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator

from jobs.statuses import STEP_ACTIVE, StepStatus

KIND = "agent"
RETRIEVAL_TOOL = "retrieval"
WORKFLOW_PREFIX = "workflow:"
WORKFLOW_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,99}$"
MAX_TURNS = 100
# A tool result longer than this many characters of JSON is cut before it goes back to the
# model and into the run's events (the child step keeps the whole output).
RESULT_CHARS = 8000

# Events stay small (they are stored and sent to every live client): a turn's text and a
# call's result are cut in them; the transcript has them whole.
EVENT_TEXT_CHARS = 2000
EVENT_RESULT_CHARS = 500

TEMPLATE_FIELDS = ("prompt", "system")

_SCRIPT_TURN_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "text": {"type": "string"},
        "tool_calls": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["tool"],
                "properties": {
                    "tool": {"type": "string", "minLength": 1},
                    "args": {},
                    "id": {"type": "string", "minLength": 1, "maxLength": 64},
                },
            },
        },
        "usage": {
            "type": "object",
            "properties": {
                "prompt_tokens": {"type": "integer", "minimum": 0},
                "completion_tokens": {"type": "integer", "minimum": 0},
            },
        },
    },
}

CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["prompt", "tools", "max_turns"],
    "properties": {
        "prompt": {"type": "string", "minLength": 1},
        "system": {"type": "string"},
        "provider": {"enum": ["simulated", "openai"]},
        "model": {"type": "string", "minLength": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "tools": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "uniqueItems": True,
        },
        "max_turns": {"type": "integer", "minimum": 1, "maximum": MAX_TURNS},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 100_000_000},
        "output_schema": {"type": "object"},
        "approve_tools": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        # The simulated provider's script: turn n replies with script[n-1]; past the end of
        # the script it answers with text and no tool call.
        "simulated": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "latency_ms": {"type": "number", "minimum": 0, "maximum": 3_600_000},
                "script": {"type": "array", "items": _SCRIPT_TURN_SCHEMA},
            },
        },
    },
}


def function_name(tool: str) -> str:
    """The name a model calls `tool` by: OpenAI's function names allow [A-Za-z0-9_-] only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", tool)[:64]


# --- the loop -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Child:
    """A child step the loop needs now: its index, kind, queue and input."""

    index: int
    kind: str
    input: dict[str, Any]


@dataclass
class Move:
    """What the loop does next: make `children` ready (`new`: they have no row yet), finish
    with `output`, fail with `error`, or nothing (children are still working)."""

    children: list[Child] = field(default_factory=list)
    new: bool = False
    output: Any = None
    finished: bool = False
    error: str | None = None
    # Events of the agent's progress: (type, data), for the run's log.
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass(frozen=True)
class State:
    """A child's state as the engine has it."""

    status: str
    output: Any = None
    error: str | None = None


def child_for_call(call: dict[str, Any], index: int, args: dict[str, Any] | None = None) -> Child:
    """The step that runs one tool call (a call whose arguments were valid), with `args` as
    a reviewer approved them if they were edited."""
    tool = call["tool"]
    args = call.get("args") or {} if args is None else args
    if tool == RETRIEVAL_TOOL:
        return Child(index, "retrieval", {"query": str(args.get("query", "")), **_top_k(args)})
    if tool.startswith(WORKFLOW_PREFIX):
        return Child(index, "workflow", {"workflow": tool[len(WORKFLOW_PREFIX) :], "input": args})
    return Child(index, "tool", {"tool": tool, "args": args})


def _top_k(args: dict[str, Any]) -> dict[str, Any]:
    top_k = args.get("top_k")
    return {"top_k": top_k} if isinstance(top_k, int) and not isinstance(top_k, bool) else {}


def approval_for_call(agent_id: str, call: dict[str, Any], reasoning: str, index: int) -> Child:
    """The `approval` step that asks reviewers about a call of a tool in `approve_tools`: the
    tool, its arguments as a form (checked against the tool's schema when a reviewer edits
    them) and the model's reasoning; a rejection goes back to the model, so it continues."""
    schema = call.get("schema") or {"type": "object"}
    context: dict[str, Any] = {"tool": call["tool"], "arguments": call.get("args") or {}}
    if reasoning:
        context["reasoning"] = reasoning
    return Child(
        index,
        "approval",
        {
            "prompt": (
                f"The agent '{agent_id}' wants to call {call['tool']}. Approve, edit the "
                "arguments, or reject with a comment that the agent will read."
            ),
            "context": context,
            "form": {"schema": schema, "values": call.get("args") or {}},
            "on_reject": "continue",
        },
    )


def base_messages(system: str, prompt: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    return messages


def assistant_message(turn: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": turn.get("text") or None}
    if turn.get("tool_calls"):
        message["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["name"], "arguments": call.get("arguments") or "{}"},
            }
            for call in turn["tool_calls"]
        ]
    return message


def rejection(decision: Any) -> dict[str, Any]:
    """What the model is told of a call that reviewers did not approve."""
    decision = decision or {}
    if decision.get("timed_out"):
        return {"rejected": True, "comment": "no reviewer decided in time"}
    return {
        "rejected": True,
        "comment": decision.get("comment") or "",
        "by": decision.get("reviewers") or [],
    }


def call_result(call: dict[str, Any], state: State | None) -> tuple[bool, Any]:
    """(ok, result) of a tool call: its child's output, or the error the model is told."""
    if call.get("error"):
        return False, {"error": call["error"]}
    assert state is not None
    if state.status == StepStatus.SUCCEEDED:
        return True, state.output
    if state.status == StepStatus.SKIPPED:
        return False, {"error": "the call was not run"}
    reason = state.error or f"the call was {state.status}"
    return False, {"error": reason}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def result_content(result: Any) -> str:
    text = json.dumps(result, ensure_ascii=False, default=str)
    if len(text) > RESULT_CHARS:
        text = text[:RESULT_CHARS] + f"… (cut at {RESULT_CHARS} characters)"
    return text


def turn_input(
    config: dict[str, Any],
    messages: list[dict[str, Any]],
    number: int,
    *,
    timeout_s: float | None,
    deadline: str | None,
) -> dict[str, Any]:
    """The input of turn `number`: the conversation so far and what the model may call.

    The loop's deadline is set by turn 1 when it starts (now + the agent's `timeout_s`) and
    handed from each turn's output to the next turn's input (`agent_deadline`)."""
    turn: dict[str, Any] = {
        "agent_turn": number,
        "messages": messages,
        "tools": list(config.get("tools", [])),
    }
    for name in ("provider", "model", "temperature", "simulated", "approve_tools"):
        if config.get(name) is not None:
            turn[name] = config[name]
    if timeout_s is not None:
        turn["agent_timeout_s"] = timeout_s
    if deadline is not None:
        turn["agent_deadline"] = deadline
    return turn


def turn_event(number: int, turn: dict[str, Any]) -> tuple[str, dict]:
    data: dict[str, Any] = {
        "turn": number,
        "text": _cut(turn.get("text") or "", EVENT_TEXT_CHARS),
        "tool_calls": [call["tool"] for call in turn.get("tool_calls", [])],
        "usage": turn.get("usage") or {},
    }
    if turn.get("latency_ms") is not None:
        data["latency_ms"] = turn["latency_ms"]
    return "agent.turn", data


def call_events(number: int, turn: dict[str, Any]) -> list[tuple[str, dict]]:
    events = []
    for call in turn.get("tool_calls", []):
        data = {"turn": number, "call": call["id"], "tool": call["tool"], "args": call.get("args")}
        if call.get("error"):
            data["error"] = call["error"]
        elif call.get("approval"):
            data["approval"] = True  # waits for a reviewer before it runs
        events.append(("agent.tool_call", data))
    return events


def result_event(number: int, call: dict[str, Any], ok: bool, result: Any) -> tuple[str, dict]:
    return (
        "agent.tool_result",
        {
            "turn": number,
            "call": call["id"],
            "tool": call["tool"],
            "ok": ok,
            "result": _cut(result_content(result), EVENT_RESULT_CHARS),
        },
    )


def final_output(
    config: dict[str, Any], turn: dict[str, Any], number: int, usage: dict[str, int]
) -> tuple[Any, str | None]:
    """The agent's output from its last turn, or why it is refused (`output_schema`)."""
    text = turn.get("text") or ""
    output: dict[str, Any] = {"text": text, "turns": number, "usage": usage}
    schema = config.get("output_schema")
    if schema is None:
        return output, None
    try:
        data = json.loads(_strip_fence(text))
    except ValueError:
        return None, f"the final answer of turn {number} is not JSON, as output_schema requires"
    errors = sorted(Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in errors[0].path)
        return None, (
            f"the final answer of turn {number} does not match output_schema: "
            f"{('output' + where) if where else 'output'}: {errors[0].message}"
        )
    output["data"] = data
    return output, None


def _strip_fence(text: str) -> str:
    """Models often wrap JSON in a ``` fence; the JSON inside is the answer."""
    match = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, flags=re.S)
    return match.group(1) if match else text


@dataclass
class _CallMove:
    """Where one tool call of a turn stands: the indices it takes (none for a refused call,
    two for a call that waits for approval: the approval, then the call), and either a child
    to make ready, children still at work, or its result."""

    width: int
    child: Child | None = None
    new: bool = False
    busy: bool = False
    result: tuple[bool, Any] | None = None


def _call_move(
    call: dict[str, Any], children: dict[int, State], index: int, *, agent_id: str, reasoning: str
) -> _CallMove:
    if call.get("error"):
        return _CallMove(0, result=call_result(call, None))
    width, args = 1, None
    if call.get("approval"):
        width = 2
        decision = children.get(index)
        if decision is None or decision.status == StepStatus.PENDING:
            child = approval_for_call(agent_id, call, reasoning, index)
            return _CallMove(width, child=child, new=decision is None)
        if decision.status in STEP_ACTIVE:
            return _CallMove(width, busy=True)
        verdict = decision.output or {}
        if decision.status != StepStatus.SUCCEEDED:
            error = decision.error or f"the approval was {decision.status}"
            return _CallMove(width, result=(False, {"error": error}))
        if not verdict.get("approved"):
            return _CallMove(width, result=(False, rejection(verdict)))
        args = verdict.get("data") or call.get("args") or {}
        index += 1
    state = children.get(index)
    if state is None or state.status == StepStatus.PENDING:
        return _CallMove(width, child=child_for_call(call, index, args), new=state is None)
    if state.status in STEP_ACTIVE:
        return _CallMove(width, busy=True)
    return _CallMove(width, result=call_result(call, state))


def progress(
    config: dict[str, Any],
    *,
    system: str,
    prompt: str,
    children: dict[int, State],
    timeout_s: float | None = None,
    agent_id: str = "agent",
) -> Move:
    """The loop's next move, from its configuration (`prompt` and `system` rendered) and the
    states of its children by index. Pure; see the module docstring."""
    max_turns = int(config["max_turns"])
    max_tokens = config.get("max_tokens")
    messages = base_messages(system, prompt)
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    index, number, deadline = 0, 1, None
    carried: list[tuple[str, dict]] = []  # events of the last transition not yet reported
    while True:
        state = children.get(index)
        if state is None or state.status == StepStatus.PENDING:
            turn = turn_input(config, messages, number, timeout_s=timeout_s, deadline=deadline)
            child = Child(index, "llm", turn)
            return Move(children=[child], new=state is None, events=carried)
        if state.status in STEP_ACTIVE:
            return Move()
        if state.status != StepStatus.SUCCEEDED:
            # The events carried to this turn went out when it was created.
            reason = state.error or f"it was {state.status}"
            return Move(error=f"turn {number} failed: {reason}")
        turn = state.output or {}
        deadline = turn.get("agent_deadline", deadline)
        for name in usage:
            usage[name] += int((turn.get("usage") or {}).get(name) or 0)
        messages.append(assistant_message(turn))
        calls = turn.get("tool_calls") or []
        events = [turn_event(number, turn), *call_events(number, turn)]
        if not calls:
            output, error = final_output(config, turn, number, usage)
            return Move(output=output, finished=error is None, error=error, events=events)
        if turn.get("daily_budget_spent"):
            return Move(error=turn["daily_budget_spent"], events=events)
        if max_tokens and usage["total_tokens"] >= max_tokens:
            return Move(
                error=(
                    f"the token budget of {max_tokens} is spent after turn {number} "
                    f"({usage['total_tokens']} tokens used) while the model still calls tools"
                ),
                events=events,
            )
        if number >= max_turns:
            return Move(
                error=(
                    f"max_turns ({max_turns}) reached: turn {number} still calls tools "
                    f"({', '.join(call['tool'] for call in calls)})"
                ),
                events=events,
            )
        waiting: list[Child] = []
        new = False
        busy = False
        results: list[tuple[str, dict]] = []
        next_index = index + 1
        reasoning = turn.get("text") or ""
        for call in calls:
            step = _call_move(call, children, next_index, agent_id=agent_id, reasoning=reasoning)
            next_index += step.width
            if step.child is not None:
                waiting.append(step.child)
                new = new or step.new
            elif step.busy:
                busy = True
            else:
                assert step.result is not None
                ok, result = step.result
                messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "content": result_content(result)}
                )
                results.append(result_event(number, call, ok, result))
        if waiting:
            # The turn's events go out with its first children; an approved call's step,
            # created later, adds none.
            first = new and not any(i in children for i in range(index + 1, next_index))
            return Move(children=waiting, new=new, events=events if first else [])
        if busy:
            return Move()
        carried = results if any(not c.get("error") for c in calls) else events + results
        index, number = next_index, number + 1


# --- the transcript -----------------------------------------------------------------------


def transcript(children: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as people read it, from the children's rows by index (each a dict
    with `status`, `output`, `error`, `started_at`, `finished_at`, `duration_ms`): one entry
    per turn with its text, token usage and time, and its tool calls with their arguments,
    status and result. Walks the children as `progress` does."""
    turns: list[dict[str, Any]] = []
    index, number = 0, 1
    while index in children:
        row = children[index]
        output = row.get("output") or {}
        entry: dict[str, Any] = {
            "turn": number,
            "status": row["status"],
            "text": output.get("text") or "",
            "usage": output.get("usage") or {},
            "started_at": row.get("started_at"),
            "finished_at": row.get("finished_at"),
            "duration_ms": row.get("duration_ms"),
            "error": row.get("error") or None,
            "tool_calls": [],
        }
        turns.append(entry)
        if row["status"] != StepStatus.SUCCEEDED:
            break
        next_index = index + 1
        for call in output.get("tool_calls") or []:
            shown: dict[str, Any] = {
                "id": call["id"],
                "tool": call["tool"],
                "args": call.get("args"),
            }
            if call.get("error"):
                shown.update(status="refused", result={"error": call["error"]})
            elif call.get("approval"):
                decision = children.get(next_index)
                next_index += 2
                _show_decision(shown, decision, children.get(next_index - 1))
            else:
                child = children.get(next_index)
                next_index += 1
                if child is None:
                    shown["status"] = StepStatus.PENDING
                else:
                    shown["status"] = child["status"]
                    shown["duration_ms"] = child.get("duration_ms")
                    if child["status"] == StepStatus.SUCCEEDED:
                        shown["result"] = child.get("output")
                    elif child.get("error"):
                        shown["result"] = {"error": child["error"]}
            entry["tool_calls"].append(shown)
        index, number = next_index, number + 1
    return turns


def _show_decision(
    shown: dict[str, Any], decision: dict[str, Any] | None, call: dict[str, Any] | None
) -> None:
    """A call that waited for reviewers: their decision, then the call if it ran."""
    if decision is None or decision["status"] != StepStatus.SUCCEEDED:
        shown["status"] = "awaiting approval" if decision is not None else StepStatus.PENDING
        if decision is not None and decision["status"] in (StepStatus.FAILED, StepStatus.CANCELLED):
            shown.update(status=decision["status"], result={"error": decision.get("error")})
        return
    verdict = decision.get("output") or {}
    shown["approval"] = {
        "approved": bool(verdict.get("approved")),
        "comment": verdict.get("comment") or "",
        "reviewers": verdict.get("reviewers") or [],
    }
    if not verdict.get("approved"):
        shown.update(status="rejected", result=rejection(verdict))
        return
    if verdict.get("data") and verdict["data"] != shown["args"]:
        shown["approval"]["edited_args"] = verdict["data"]
    if call is None:
        shown["status"] = StepStatus.PENDING
        return
    shown["status"] = call["status"]
    shown["duration_ms"] = call.get("duration_ms")
    if call["status"] == StepStatus.SUCCEEDED:
        shown["result"] = call.get("output")
    elif call.get("error"):
        shown["result"] = {"error": call["error"]}
