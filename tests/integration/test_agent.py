"""The agent step through the real transitions and handlers, in this process (PostgreSQL, no
broker): every turn and tool call is a child step claimed and reported as a worker would.

The same loop under real worker processes killed mid-turn and mid-call is in
test_agent_cluster.py.
"""

from __future__ import annotations

import json

import pytest

from jobs.definitions import DefinitionError
from jobs.models import Event, Run
from jobs.services.documents import documents_add
from jobs.services.operations import run_rerun_from
from jobs.services.workflows import workflow_version_create
from jobs.transitions.runs import run_retry
from tests.support import tools
from tests.support.agents import children, drive, support_agent
from tests.support.dashboard import make_operator, signed_in
from tests.support.workflows import assert_gapless, submit


@pytest.fixture
def policy(owner, ledger):
    documents_add(
        tenant=owner.tenant,
        documents=[{"title": "Refund policy", "text": "Refunds within 30 days of purchase."}],
    )


def test_a_scripted_run_with_parallel_tool_calls_ends_with_its_transcript_and_output(owner, policy):
    schema = {
        "type": "object",
        "required": ["refund"],
        "properties": {"refund": {"type": "boolean"}},
    }
    run = submit(owner.tenant, support_agent(output_schema=schema), {"order": 7})

    run = drive(run)

    assert run.status == "succeeded", run.error
    assert run.output["data"] == {"refund": True, "amount": 120}
    assert run.output["turns"] == 3
    rows = children(run)
    assert [(s.map_index, s.kind, s.queue, s.status) for s in rows] == [
        (0, "llm", "steps.llm", "succeeded"),
        (1, "tool", "steps.tool", "succeeded"),
        (2, "retrieval", "steps.retrieval", "succeeded"),
        (3, "llm", "steps.llm", "succeeded"),
        (4, "tool", "steps.tool", "succeeded"),
        (5, "llm", "steps.llm", "succeeded"),
    ]
    # The two calls of turn 1 were ready together (parallel), before turn 2 existed.
    assert rows[1].ready_at == rows[2].ready_at < rows[3].ready_at
    assert rows[2].output["documents"][0]["title"] == "Refund policy"
    third = rows[5].input["messages"]
    assert [m["role"] for m in third] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "tool",
    ]
    assert json.loads(third[3]["content"])["call"] == 1
    assert len(tools.calls("order-7")) == 1
    usage = sum(s.output["usage"]["total_tokens"] for s in rows if s.kind == "llm")
    assert run.output["usage"]["total_tokens"] == usage > 0
    assert_gapless(run)
    events = list(Event.objects.filter(run=run).order_by("seq"))
    agent_events = [(e.type, e.data.get("turn"), e.data.get("tool")) for e in events]
    agent_events = [e for e in agent_events if e[0].startswith("agent.")]
    assert agent_events == [
        ("agent.turn", 1, None),
        ("agent.tool_call", 1, "test.count"),
        ("agent.tool_call", 1, "retrieval"),
        ("agent.tool_result", 1, "test.count"),
        ("agent.tool_result", 1, "retrieval"),
        ("agent.turn", 2, None),
        ("agent.tool_call", 2, "echo"),
        ("agent.tool_result", 2, "echo"),
        ("agent.turn", 3, None),
    ]
    assert events[-1].type == "run.succeeded"


def test_a_final_answer_that_breaks_the_output_schema_fails_the_run_saying_why(owner, policy):
    schema = {
        "type": "object",
        "required": ["refund"],
        "properties": {"refund": {"type": "string"}},
    }
    run = drive(submit(owner.tenant, support_agent(output_schema=schema), {"order": 7}))
    assert run.status == "failed"
    assert run.error == (
        "step 'helper' failed: the final answer of turn 3 does not match output_schema: "
        "output.refund: True is not of type 'string'"
    )


def test_arguments_that_break_a_tools_schema_go_back_to_the_model_and_the_call_never_runs(
    owner,
):
    script = [
        {"tool_calls": [{"tool": "http", "args": {"uri": "http://example.com"}}]},
        {"text": "I could not call it."},
    ]
    definition = support_agent(
        tools=["http"], simulated={"latency_ms": 0, "script": script}, name="bad-args"
    )
    run = drive(submit(owner.tenant, definition, {"order": 7}))
    assert run.status == "succeeded", run.error
    rows = children(run)
    assert [s.kind for s in rows] == ["llm", "llm"]
    told = rows[1].input["messages"][-1]
    assert told["role"] == "tool"
    assert (
        "the arguments of http do not match: args: 'url' is a required property"
        in (told["content"])
    )


def test_max_turns_ends_the_loop_with_a_clear_error(owner, policy):
    run = drive(submit(owner.tenant, support_agent(max_turns=2), {"order": 7}))
    assert run.status == "failed"
    assert run.error == (
        "step 'helper' failed: max_turns (2) reached: turn 2 still calls tools (echo)"
    )
    assert [s.map_index for s in children(run)] == [0, 1, 2, 3]


def test_the_timeout_ends_the_loop_before_the_next_turn(owner, policy, monkeypatch):
    run = submit(owner.tenant, support_agent(timeout_s=0.001), {"order": 7})
    run = drive(run)
    assert run.status == "failed"
    assert "the agent's timeout of 0.001 s passed before turn" in run.error


def test_a_workflow_of_the_tenant_is_a_tool_that_runs_as_a_child_run(owner):
    lookup = {
        "name": "order-lookup",
        "description": "Look up an order by its number.",
        "input_schema": {
            "type": "object",
            "required": ["order"],
            "properties": {"order": {"type": "integer"}},
        },
        "steps": [
            {"id": "find", "kind": "tool", "tool": "echo", "args": {"order": "{{ input.order }}"}}
        ],
        "output": "{{ steps.find.output.args }}",
    }
    submit(owner.tenant, lookup, {"order": 1})  # registers the workflow
    script = [
        {"tool_calls": [{"tool": "workflow:order-lookup", "args": {"order": 7}}]},
        {"text": "Order 7 found."},
    ]
    definition = support_agent(
        tools=["workflow:order-lookup"],
        simulated={"latency_ms": 0, "script": script},
        name="with-workflow",
    )
    run = drive(submit(owner.tenant, definition, {"order": 7}))
    assert run.status == "succeeded", run.error
    call = children(run)[1]
    assert call.kind == "workflow" and call.output == {"order": 7}
    assert Run.objects.get(parent_step=call).status == "succeeded"
    spec = children(run)[0].input["tools"]
    assert spec == ["workflow:order-lookup"]


def test_a_failed_turn_is_retried_by_a_run_retry_from_that_turn(owner, policy, monkeypatch):
    from jobs.steps import llm

    real = llm._simulated_turn
    broken = {"on": True}

    def flaky(ctx, messages):
        if broken["on"] and ctx.input["agent_turn"] == 2:
            raise llm.StepFailure("provider down", code="provider_rejected", retryable=False)
        return real(ctx, messages)

    monkeypatch.setattr(llm, "_simulated_turn", flaky)
    run = drive(submit(owner.tenant, support_agent(), {"order": 7}))
    assert run.status == "failed"
    assert run.error == "step 'helper' failed: turn 2 failed: provider down"
    broken["on"] = False
    run_retry(run=run)
    run = drive(run)
    assert run.status == "succeeded", run.error
    # The completed calls of turn 1 ran once; turn 2 ran again on the same row.
    assert len(tools.calls("order-7")) == 1
    assert [s.map_index for s in children(run)] == [0, 1, 2, 3, 4, 5]


def test_the_run_detail_of_the_api_includes_the_transcript(owner, outsider, policy):
    run = drive(submit(owner.tenant, support_agent(), {"order": 7}))

    response = owner.api.get(f"/api/v1/runs/{run.public_id}/")

    assert response.status_code == 200
    [first, second, third] = response.json()["agents"]["helper"]
    assert first["text"] == "Let me look up the order and the policy."
    assert [(c["tool"], c["args"], c["status"]) for c in first["tool_calls"]] == [
        ("test.count", {"key": "order-7"}, "succeeded"),
        ("retrieval", {"query": "refund policy"}, "succeeded"),
    ]
    assert first["tool_calls"][1]["result"]["documents"][0]["title"] == "Refund policy"
    assert first["usage"]["total_tokens"] > 0 and first["duration_ms"] >= 0
    assert [c["result"] for c in second["tool_calls"]] == [{"args": {"refund": 120}}]
    assert third["text"] == '{"refund": true, "amount": 120}' and third["tool_calls"] == []
    assert outsider.api.get(f"/api/v1/runs/{run.public_id}/").status_code == 404


def test_the_run_page_shows_the_transcript_as_a_conversation_with_calls_folded(owner, policy):
    run = drive(submit(owner.tenant, support_agent(), {"order": 7}))
    client = signed_in(make_operator())

    page = client.get(f"/dashboard/runs/{run.public_id}/").content.decode()

    agent = page[page.index('data-agent="helper"') :]
    assert "3 turns" in agent
    assert agent.index("Turn 1") < agent.index("Let me look up the order and the policy.")
    assert agent.index("Turn 2") < agent.index("Turn 3") < agent.index("&quot;refund&quot;: true")
    first = agent[agent.index('data-turn="1"') : agent.index('data-turn="2"')]
    assert first.count('<details class="tool-call"') == 2
    assert 'data-tool="retrieval" data-status="succeeded"' in first
    assert "Refund policy" in first and "&quot;query&quot;: &quot;refund policy&quot;" in first


def test_the_tenants_daily_token_budget_ends_the_loop_with_a_clear_error(owner, policy):
    owner.tenant.llm_tokens_per_day = 60
    owner.tenant.save(update_fields=["llm_tokens_per_day"])
    run = drive(submit(owner.tenant, support_agent(), {"order": 7}))
    assert run.status == "failed"
    assert "the tenant's daily budget of 60 LLM tokens is spent (" in run.error
    assert "while turn 2 still calls tools" in run.error
    # The turns that ran are kept, their tokens counted; no third turn was made.
    assert [s.kind for s in children(run)] == ["llm", "tool", "retrieval", "llm"]


def test_an_agents_workflow_tools_must_name_workflows_the_tenant_has(owner):
    tools = ["echo", "workflow:order-lookpu", "workflow:support-agent"]
    definition = support_agent(tools=tools, simulated={"script": []})
    with pytest.raises(DefinitionError) as raised:
        workflow_version_create(tenant=owner.tenant, document=definition)
    assert [str(fault) for fault in raised.value.faults] == [
        "steps[0].tools[1]: unknown workflow 'order-lookpu'",
        "steps[0].tools[2]: a workflow cannot call itself",
    ]


def test_a_rerun_from_the_agent_runs_its_loop_again_from_turn_one(owner, policy):
    run = drive(submit(owner.tenant, support_agent(), {"order": 7}))
    assert run.status == "succeeded"
    run_rerun_from(run=run, step_id="helper", by="test")
    run = drive(run)
    assert run.status == "succeeded", run.error
    assert [s.map_index for s in children(run)] == [0, 1, 2, 3, 4, 5]
    assert len(tools.calls("order-7")) == 2  # once per run of the loop
