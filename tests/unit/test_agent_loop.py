"""The agent step's loop in the engine: turns and tool calls as numbered children, decided
from their checkpoints alone (jobs.steps.agent, jobs.engine)."""

from __future__ import annotations

import json

import pytest

from jobs.definitions import DefinitionError, parse_definition
from jobs.engine import StepState, advance, apply, initial_states
from jobs.statuses import StepStatus
from jobs.steps.agent import transcript


def agent_definition(**fields):
    step = {
        "id": "helper",
        "kind": "agent",
        "system": "You help.",
        "prompt": "Order {{ input.order }}?",
        "tools": ["echo", "retrieval"],
        "max_turns": 4,
        **fields,
    }
    return parse_definition(
        {"name": "agentic", "steps": [step], "output": "{{ steps.helper.output }}"}
    )


def turn(text="", calls=(), tokens=10, number=1):
    return {
        "turn": number,
        "text": text,
        "tool_calls": [
            {
                "id": call_id,
                "name": tool,
                "tool": tool,
                "arguments": json.dumps(args),
                "args": args,
                **({"error": error} if error else {}),
            }
            for call_id, tool, args, error in calls
        ],
        "usage": {"prompt_tokens": tokens - 2, "completion_tokens": 2, "total_tokens": tokens},
    }


def succeed(states, key, output):
    states = dict(states)
    states[key] = StepState(StepStatus.SUCCEEDED, output=output)
    return states


def step(definition, states):
    plan = advance(definition, {"order": 7}, states)
    return plan, apply(states, plan)


def test_a_scripted_loop_runs_parallel_calls_then_finishes_with_the_last_text():
    definition = agent_definition()
    plan, states = step(definition, initial_states(definition))
    assert plan.waiting == [("helper", None)]
    [first] = plan.spawned
    assert first.key == ("helper", 0) and first.kind == "llm" and first.queue == "steps.llm"
    assert first.input["messages"] == [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Order 7?"},
    ]
    assert first.input["tools"] == ["echo", "retrieval"]

    calls = [("c1", "echo", {"order": 7}, None), ("c2", "retrieval", {"query": "refund"}, None)]
    plan, states = step(definition, succeed(states, ("helper", 0), turn("Looking.", calls)))
    assert [(r.key, r.kind, r.queue) for r in plan.spawned] == [
        (("helper", 1), "tool", "steps.tool"),
        (("helper", 2), "retrieval", "steps.retrieval"),
    ]
    assert plan.spawned[0].input == {"tool": "echo", "args": {"order": 7}}
    assert plan.spawned[1].input == {"query": "refund"}
    assert [(t, d.get("tool")) for _k, t, d in plan.events] == [
        ("agent.turn", None),
        ("agent.tool_call", "echo"),
        ("agent.tool_call", "retrieval"),
    ]

    # One call done: nothing moves until both are.
    plan, states = step(definition, succeed(states, ("helper", 1), {"args": {"order": 7}}))
    assert plan.is_empty()
    plan, states = step(definition, succeed(states, ("helper", 2), {"documents": []}))
    [second] = plan.spawned
    assert second.key == ("helper", 3) and second.input["agent_turn"] == 2
    assert second.input["messages"][2]["tool_calls"][0]["function"]["name"] == "echo"
    assert second.input["messages"][3:] == [
        {"role": "tool", "tool_call_id": "c1", "content": '{"args": {"order": 7}}'},
        {"role": "tool", "tool_call_id": "c2", "content": '{"documents": []}'},
    ]
    assert [t for _k, t, _d in plan.events] == ["agent.tool_result", "agent.tool_result"]

    plan, states = step(definition, succeed(states, ("helper", 3), turn("Done: 7.", number=2)))
    assert plan.completed == [
        (
            ("helper", None),
            {
                "text": "Done: 7.",
                "turns": 2,
                "usage": {"prompt_tokens": 16, "completion_tokens": 4, "total_tokens": 20},
            },
        )
    ]
    assert plan.run_status == "succeeded"
    assert plan.run_output["text"] == "Done: 7."
    # Advancing the same states again changes nothing: no child is made twice.
    assert advance(definition, {"order": 7}, states).is_empty()


def test_a_call_with_bad_arguments_does_not_run_and_its_error_goes_back_to_the_model():
    definition = agent_definition()
    _plan, states = step(definition, initial_states(definition))
    bad = [("c1", "retrieval", {"q": "x"}, "the arguments of retrieval do not match")]
    plan, states = step(definition, succeed(states, ("helper", 0), turn("", bad)))
    [second] = plan.spawned
    assert second.key == ("helper", 1) and second.kind == "llm"
    assert second.input["messages"][-1]["content"] == (
        '{"error": "the arguments of retrieval do not match"}'
    )
    assert [t for _k, t, _d in plan.events] == [
        "agent.turn",
        "agent.tool_call",
        "agent.tool_result",
    ]


def test_a_failed_tool_call_is_a_result_for_the_model_not_the_end_of_the_loop():
    definition = agent_definition()
    _plan, states = step(definition, initial_states(definition))
    calls = [("c1", "echo", {}, None)]
    _plan, states = step(definition, succeed(states, ("helper", 0), turn("", calls)))
    states[("helper", 1)] = StepState(StepStatus.FAILED, error="boom")
    plan, _states = step(definition, states)
    [second] = plan.spawned
    assert second.input["messages"][-1]["content"] == '{"error": "boom"}'


def loop_until(definition, states, *, turns):
    for number in range(1, turns + 1):
        index = max(i for sid, i in states if i is not None)
        calls = [(f"c{number}", "echo", {}, None)]
        plan, states = step(definition, succeed(states, ("helper", index), turn("", calls)))
        if plan.run_status:
            return plan
        plan, states = step(definition, succeed(states, ("helper", index + 1), {}))
    return plan


def test_max_turns_ends_a_loop_that_keeps_calling_tools():
    definition = agent_definition(max_turns=2)
    _plan, states = step(definition, initial_states(definition))
    plan = loop_until(definition, states, turns=2)
    assert plan.run_status == "failed"
    assert plan.run_error == (
        "step 'helper' failed: max_turns (2) reached: turn 2 still calls tools (echo)"
    )


def test_the_token_budget_ends_the_loop_with_the_count():
    definition = agent_definition(max_tokens=15)
    _plan, states = step(definition, initial_states(definition))
    plan = loop_until(definition, states, turns=3)
    assert plan.run_status == "failed"
    assert "the token budget of 15 is spent after turn 2 (20 tokens used)" in plan.run_error


def test_the_output_schema_is_enforced_on_the_final_answer():
    schema = {
        "type": "object",
        "required": ["refund"],
        "properties": {"refund": {"type": "boolean"}},
    }
    definition = agent_definition(output_schema=schema)
    _plan, states = step(definition, initial_states(definition))
    plan, _ = step(definition, succeed(states, ("helper", 0), turn('{"refund": "yes"}')))
    assert plan.run_status == "failed"
    assert plan.run_error.endswith(
        "the final answer of turn 1 does not match output_schema: output.refund: "
        "'yes' is not of type 'boolean'"
    )
    plan, _ = step(
        definition, succeed(states, ("helper", 0), turn('```json\n{"refund": true}\n```'))
    )
    assert plan.run_status == "succeeded"
    assert plan.run_output["data"] == {"refund": True}


def test_a_failed_turn_fails_the_agent_and_cancels_nothing_finished():
    definition = agent_definition()
    _plan, states = step(definition, initial_states(definition))
    states[("helper", 0)] = StepState(StepStatus.FAILED, error="provider said no")
    plan, _ = step(definition, states)
    assert plan.failed == [(("helper", None), "turn 1 failed: provider said no")]
    assert plan.run_status == "failed"


def test_a_child_reset_to_pending_by_a_run_retry_is_made_ready_again_not_created():
    definition = agent_definition()
    _plan, states = step(definition, initial_states(definition))
    states[("helper", None)] = StepState(StepStatus.WAITING)
    states[("helper", 0)] = StepState(StepStatus.PENDING)
    plan, _ = step(definition, states)
    assert plan.spawned == [] and [r.key for r in plan.ready] == [("helper", 0)]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tools": ["ech0"]}, "steps[0].tools[0]: unknown tool 'ech0'"),
        ({"tools": ["workflow:Bad Name"]}, "does not name a workflow"),
        ({"approve_tools": ["http"]}, "steps[0].approve_tools[0]: 'http' is not one"),
        ({"output_schema": {"type": "nope"}}, "steps[0].output_schema: is not a valid JSON"),
        ({"max_turns": None}, "max_turns"),
    ],
)
def test_upload_names_unknown_tools_bad_schemas_and_loops_without_max_turns(fields, message):
    step_fields = {k: v for k, v in fields.items() if v is not None}
    if fields.get("max_turns", 1) is None:
        document = {
            "name": "agentic",
            "steps": [{"id": "a", "kind": "agent", "prompt": "p", "tools": ["echo"]}],
        }
    else:
        document = {
            "name": "agentic",
            "steps": [
                {
                    "id": "a",
                    "kind": "agent",
                    "prompt": "p",
                    "tools": ["echo"],
                    "max_turns": 3,
                    **step_fields,
                }
            ],
        }
    with pytest.raises(DefinitionError) as raised:
        parse_definition(document)
    assert message in str(raised.value)


def test_an_agent_cannot_be_the_step_of_a_map():
    inner = {"kind": "agent", "prompt": "p", "tools": ["echo"], "max_turns": 2}
    document = {
        "name": "m",
        "steps": [{"id": "m", "kind": "map", "over": "{{ input.x }}", "step": inner}],
    }
    with pytest.raises(DefinitionError, match=r"steps\[0\].step.kind: an agent cannot be"):
        parse_definition(document)


def test_the_transcript_reads_each_turn_and_call_with_reviewers_decisions():

    first = turn(
        "Refunding.",
        [
            ("c1", "echo", {"n": 1}, None),
            ("c2", "shop.refund", {"amount": 120}, None),
            ("c3", "shop.refund", {"amount": 5}, None),
        ],
    )
    for call in first["tool_calls"][1:]:
        call["approval"] = True
    approved = {"approved": True, "reviewers": ["ann"], "comment": "", "data": {"amount": 60}}
    rejected = {"approved": False, "reviewers": ["bob"], "comment": "No.", "data": {}}
    rows = {
        0: {"status": "succeeded", "output": first},
        1: {"status": "succeeded", "output": {"args": {"n": 1}}, "duration_ms": 4},
        2: {"status": "succeeded", "output": approved},
        3: {"status": "succeeded", "output": {"refunded": 60}},
        4: {"status": "succeeded", "output": rejected},
        # 5 is the rejected call's: never created
        6: {"status": "running", "output": None},
    }
    [one, two] = transcript(rows)
    assert one["text"] == "Refunding." and one["usage"]["total_tokens"] == 10
    echo, refund, refused = one["tool_calls"]
    assert (echo["status"], echo["result"], echo["duration_ms"]) == (
        "succeeded",
        {"args": {"n": 1}},
        4,
    )
    assert refund["approval"] == {
        "approved": True,
        "comment": "",
        "reviewers": ["ann"],
        "edited_args": {"amount": 60},
    }
    assert (refund["status"], refund["result"]) == ("succeeded", {"refunded": 60})
    assert refused["status"] == "rejected"
    assert refused["result"] == {"rejected": True, "comment": "No.", "by": ["bob"]}
    assert (two["turn"], two["status"], two["text"]) == (2, "running", "")


def test_a_failing_agent_cancels_its_open_children_and_no_index_a_rejection_left_empty():
    definition = agent_definition()
    states = {
        ("helper", None): StepState(StepStatus.WAITING),
        ("helper", 0): StepState(StepStatus.SUCCEEDED, output=turn("", [("c", "echo", {}, None)])),
        ("helper", 1): StepState(StepStatus.SUCCEEDED, output={}),
        ("helper", 2): StepState(StepStatus.FAILED, error="provider down"),
        # index 3 does not exist (as after a rejected call); 4 is still queued
        ("helper", 4): StepState(StepStatus.QUEUED),
    }
    plan = advance(definition, {"order": 7}, states)
    assert plan.failed == [(("helper", None), "turn 2 failed: provider down")]
    assert plan.cancelled == [("helper", 4)]
