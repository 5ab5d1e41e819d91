"""The engine (jobs.engine): what becomes ready, skipped, expanded, completed, failed."""

from __future__ import annotations

import pytest

from jobs.definitions import parse_definition
from jobs.engine import (
    Plan,
    ReadyStep,
    StepState,
    advance,
    apply,
    initial_states,
)
from jobs.statuses import STEP_ACTIVE, STEP_FINAL, StepStatus
from jobs.steps import registry


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_kinds", dict(registry._BUILTIN_KINDS))
    monkeypatch.setattr(registry, "_tools", {})
    registry.register_tool("echo")(lambda ctx, **args: args)


def definition(*steps, output=None):
    document = {"name": "wf", "steps": list(steps)}
    if output is not None:
        document["output"] = output
    return parse_definition(document)


def llm(step_id, prompt="Hello", **fields):
    return {"id": step_id, "kind": "llm", "prompt": prompt, **fields}


def map_step(step_id, over, prompt="{{ item }}", **fields):
    return {
        "id": step_id,
        "kind": "map",
        "over": over,
        "step": {"kind": "llm", "prompt": prompt},
        **fields,
    }


def ready_keys(plan: Plan) -> list:
    return [ready.key for ready in plan.ready]


def step_ready(plan: Plan, key) -> ReadyStep:
    return next(ready for ready in plan.ready if ready.key == key)


def succeed(states, key, output=None):
    states = dict(states)
    states[key] = StepState(StepStatus.SUCCEEDED, output=output)
    return states


def fail(states, key, error="boom"):
    states = dict(states)
    states[key] = StepState(StepStatus.FAILED, error=error)
    return states


def settle(wf, run_input, states):
    """Advance and apply once; check that advancing again changes nothing."""
    plan = advance(wf, run_input, states)
    states = apply(states, plan)
    assert advance(wf, run_input, states).is_empty()
    return plan, states


# --- starting ---------------------------------------------------------------------------------


def test_initial_states_are_all_pending():
    wf = definition(llm("a"), map_step("m", "{{ [1] }}"))
    assert initial_states(wf) == {
        ("a", None): StepState(StepStatus.PENDING),
        ("m", None): StepState(StepStatus.PENDING),
    }


def test_steps_without_dependencies_are_ready_at_once():
    wf = definition(llm("a"), llm("b"), llm("c", after=["a"]))
    plan = advance(wf, {}, initial_states(wf))
    assert ready_keys(plan) == [("a", None), ("b", None)]
    assert plan.run_status is None


def test_a_ready_step_carries_its_kind_queue_and_rendered_input():
    wf = definition(llm("a", "Label: {{ input.ticket }}", model="m1", simulated={"latency_ms": 5}))
    plan = advance(wf, {"ticket": "refund"}, initial_states(wf))
    assert plan.ready == [
        ReadyStep(
            key=("a", None),
            kind="llm",
            queue="steps.llm",
            input={"prompt": "Label: refund", "model": "m1", "simulated": {"latency_ms": 5}},
        )
    ]


def test_tool_args_render_recursively_to_native_values():
    wf = definition(
        {
            "id": "t",
            "kind": "tool",
            "tool": "echo",
            "args": {"ids": "{{ input.ids }}", "nested": [{"n": "{{ input.ids | length }}"}]},
        }
    )
    plan = advance(wf, {"ids": [1, 2]}, initial_states(wf))
    assert plan.ready[0].input == {"tool": "echo", "args": {"ids": [1, 2], "nested": [{"n": 2}]}}


def test_a_text_field_stays_text_when_its_template_yields_a_value():
    wf = definition(llm("a"), llm("b", "{{ steps.a.output }}"), llm("c", "{{ steps.a.output.x }}"))
    _, states = settle(wf, {}, initial_states(wf))
    plan = advance(wf, {}, succeed(states, ("a", None), {"text": "hi"}))
    assert step_ready(plan, ("b", None)).input == {"prompt": '{"text": "hi"}'}
    assert step_ready(plan, ("c", None)).input == {"prompt": ""}


def test_a_step_waits_for_all_its_dependencies():
    wf = definition(llm("a"), llm("b"), llm("c", after=["a", "b"]))
    _, states = settle(wf, {}, initial_states(wf))
    states = succeed(states, ("a", None))
    assert advance(wf, {}, states).is_empty()
    states = succeed(states, ("b", None))
    assert ready_keys(advance(wf, {}, states)) == [("c", None)]


def test_a_template_reference_is_a_dependency():
    wf = definition(llm("a"), llm("b", "Use {{ steps.a.output.text }}"))
    plan, states = settle(wf, {}, initial_states(wf))
    assert ready_keys(plan) == [("a", None)]
    plan = advance(wf, {}, succeed(states, ("a", None), {"text": "x"}))
    assert plan.ready[0].input == {"prompt": "Use x"}


def test_active_steps_are_left_alone():
    wf = definition(llm("a"), llm("b"), llm("c"), llm("d"), llm("e"), llm("f", after=["a"]))
    states = {
        ("a", None): StepState(StepStatus.READY),
        ("b", None): StepState(StepStatus.QUEUED),
        ("c", None): StepState(StepStatus.RUNNING),
        ("d", None): StepState(StepStatus.RETRY_WAIT),
        ("e", None): StepState(StepStatus.WAITING),
        ("f", None): StepState(StepStatus.PENDING),
    }
    plan = advance(wf, {}, states)
    assert plan.is_empty()
    assert plan.run_status is None


def test_the_status_sets():
    assert sorted(STEP_ACTIVE) == ["queued", "ready", "retry_wait", "running", "waiting"]
    assert sorted(STEP_FINAL) == ["cancelled", "failed", "skipped", "succeeded"]


# --- when -------------------------------------------------------------------------------------


def test_when_true_makes_the_step_ready():
    wf = definition(llm("a"), llm("b", when="steps.a.output.text == 'refund'"))
    _, states = settle(wf, {}, initial_states(wf))
    plan = advance(wf, {}, succeed(states, ("a", None), {"text": "refund"}))
    assert ready_keys(plan) == [("b", None)]


def test_when_false_skips_the_step():
    wf = definition(llm("a"), llm("b", when="steps.a.output.text == 'refund'"))
    _, states = settle(wf, {}, initial_states(wf))
    plan = advance(wf, {}, succeed(states, ("a", None), {"text": "other"}))
    assert plan.skipped == [("b", None)]
    assert plan.ready == []


def test_skips_cascade_within_one_plan():
    wf = definition(
        llm("a", when="false"),
        llm("b", after=["a"], when="steps.a.status == 'succeeded'"),
        llm("c", "a={{ steps.a.output }} b={{ steps.b.output }}", after=["b"]),
    )
    plan = advance(wf, {}, initial_states(wf))
    assert plan.skipped == [("a", None), ("b", None)]
    assert ready_keys(plan) == [("c", None)]
    assert step_ready(plan, ("c", None)).input == {"prompt": "a= b="}


def test_a_skipped_steps_output_is_none_for_its_dependents():
    wf = definition(llm("a", when="false"), llm("b", "{{ steps.a.output }}"))
    plan = advance(wf, {}, initial_states(wf))
    # "{{ x }}" of a text field: null becomes "".
    assert step_ready(plan, ("b", None)).input == {"prompt": ""}


def test_a_when_on_a_skipped_step_sees_null():
    wf = definition(
        llm("a", when="false"),
        llm("b", when="steps.a.output is none and steps.a.status == 'skipped'"),
    )
    plan = advance(wf, {}, initial_states(wf))
    assert plan.skipped == [("a", None)]
    assert ready_keys(plan) == [("b", None)]


def test_when_can_read_the_input():
    wf = definition(llm("a", when="input.urgent"))
    assert advance(wf, {"urgent": True}, initial_states(wf)).skipped == []
    assert advance(wf, {"urgent": False}, initial_states(wf)).skipped == [("a", None)]
    assert advance(wf, {}, initial_states(wf)).skipped == [("a", None)]


def test_a_when_that_errors_fails_the_step_with_a_message_naming_it():
    wf = definition(llm("a", when="1 / 0", optional=True))
    plan = advance(wf, {}, initial_states(wf))
    assert plan.failed == [
        (
            ("a", None),
            "when of step 'a' could not be evaluated: ZeroDivisionError: division by zero",
        )
    ]


# --- failures ---------------------------------------------------------------------------------


def test_a_render_error_fails_the_step_with_a_message_naming_the_field():
    wf = definition(
        llm("ok"),
        {
            "id": "t",
            "kind": "tool",
            "tool": "echo",
            "args": {"filters": [{"n": "{{ input.n / 0 }}"}]},
        },
    )
    plan = advance(wf, {"n": 1}, initial_states(wf))
    assert plan.failed == [
        (
            ("t", None),
            "args.filters[0].n of step 't' could not be rendered: "
            "ZeroDivisionError: division by zero",
        )
    ]
    assert plan.run_status == "failed"
    assert plan.run_error == (
        "step 't' failed: args.filters[0].n of step 't' could not be rendered: "
        "ZeroDivisionError: division by zero"
    )


def test_a_failed_non_optional_step_fails_the_run_and_cancels_the_rest():
    wf = definition(
        llm("a"),
        llm("b"),
        llm("c"),
        llm("d", after=["a"]),
        llm("e", when="false", after=["c"]),
    )
    states = {
        ("a", None): StepState(StepStatus.FAILED, error="provider said no"),
        ("b", None): StepState(StepStatus.RUNNING),
        ("c", None): StepState(StepStatus.SUCCEEDED, output=1),
        ("d", None): StepState(StepStatus.PENDING),
        ("e", None): StepState(StepStatus.PENDING),
    }
    plan = advance(wf, {}, states)
    assert plan.cancelled == [("b", None), ("d", None), ("e", None)]
    assert plan.ready == [] and plan.skipped == []
    assert plan.run_status == "failed"
    assert plan.run_error == "step 'a' failed: provider said no"
    final = apply(states, plan)
    assert {key: state.status for key, state in final.items()} == {
        ("a", None): StepStatus.FAILED,
        ("b", None): StepStatus.CANCELLED,
        ("c", None): StepStatus.SUCCEEDED,
        ("d", None): StepStatus.CANCELLED,
        ("e", None): StepStatus.CANCELLED,
    }
    again = advance(wf, {}, final)
    assert again.is_empty()
    assert (again.run_status, again.run_error) == ("failed", "step 'a' failed: provider said no")


def test_a_run_failure_cancels_map_items():
    wf = definition(llm("a"), map_step("m", "{{ [1, 2, 3] }}", max_parallel=1))
    states = {
        ("a", None): StepState(StepStatus.RUNNING),
        ("m", None): StepState(StepStatus.RUNNING),
        ("m", 0): StepState(StepStatus.SUCCEEDED, output="x"),
        ("m", 1): StepState(StepStatus.RUNNING),
        ("m", 2): StepState(StepStatus.PENDING),
    }
    states = fail(states, ("a", None))
    plan = advance(wf, {}, states)
    assert plan.cancelled == [("m", None), ("m", 1), ("m", 2)]
    assert plan.run_error == "step 'a' failed: boom"


def test_a_step_that_fails_while_others_become_ready_leaves_them_pending_and_cancelled():
    # `b` could become ready in this plan, but `a` fails the run in the same plan: `b` must
    # not be both ready and cancelled.
    wf = definition(llm("a", "{{ 1 / 0 }}"), llm("b"), map_step("m", "{{ [1, 2] }}"))
    plan = advance(wf, {}, initial_states(wf))
    assert plan.ready == [] and plan.expanded == []
    assert plan.cancelled == [("b", None), ("m", None)]
    assert [key for key, _ in plan.failed] == [("a", None)]
    assert advance(wf, {}, apply(initial_states(wf), plan)).is_empty()


def test_an_optional_failure_lets_its_dependents_run_with_a_null_output():
    wf = definition(
        llm("a", optional=True),
        llm("b", "got {{ steps.a.output }} ({{ steps.a.status }})", after=["a"]),
    )
    _, states = settle(wf, {}, initial_states(wf))
    plan, states = settle(wf, {}, fail(states, ("a", None)))
    assert plan.run_status is None
    assert step_ready(plan, ("b", None)).input == {"prompt": "got  (failed)"}
    plan = advance(wf, {}, succeed(states, ("b", None), "done"))
    assert plan.run_status == "succeeded"


def test_a_cancelled_non_optional_step_fails_the_run():
    wf = definition(llm("a"), llm("b"))
    states = {
        ("a", None): StepState(StepStatus.CANCELLED),
        ("b", None): StepState(StepStatus.RUNNING),
    }
    plan = advance(wf, {}, states)
    assert plan.run_status == "failed"
    assert plan.run_error == "step 'a' was cancelled"
    assert plan.cancelled == [("b", None)]


# --- maps -------------------------------------------------------------------------------------


def test_a_map_fans_out_up_to_max_parallel():
    wf = definition(
        llm("search"),
        map_step(
            "per_doc",
            "{{ steps.search.output.documents }}",
            "{{ index }}: {{ item.text }}",
            max_parallel=2,
        ),
    )
    _, states = settle(wf, {}, initial_states(wf))
    documents = [{"text": "one"}, {"text": "two"}, {"text": "three"}]
    plan, states = settle(wf, {}, succeed(states, ("search", None), {"documents": documents}))
    assert plan.expanded == [("per_doc", documents)]
    assert plan.ready == [
        ReadyStep(("per_doc", 0), "llm", "steps.llm", {"prompt": "0: one"}),
        ReadyStep(("per_doc", 1), "llm", "steps.llm", {"prompt": "1: two"}),
    ]
    assert states[("per_doc", None)] == StepState(StepStatus.RUNNING)
    assert states[("per_doc", 2)] == StepState(StepStatus.PENDING)


def test_map_items_become_ready_in_index_order_as_earlier_ones_finish():
    wf = definition(map_step("m", "{{ [10, 20, 30, 40] }}", max_parallel=2))
    _, states = settle(wf, {}, initial_states(wf))
    # item 1 finishes first: the next item is 2 (index order), never more than 2 active.
    plan, states = settle(wf, {}, succeed(states, ("m", 1), "b"))
    assert ready_keys(plan) == [("m", 2)]
    assert step_ready(plan, ("m", 2)).input == {"prompt": "30"}
    states[("m", 0)] = StepState(StepStatus.RUNNING)
    states[("m", 2)] = StepState(StepStatus.RETRY_WAIT)
    assert advance(wf, {}, states).is_empty()


def test_a_map_completes_with_outputs_in_index_order():
    wf = definition(map_step("m", "{{ ['a', 'b', 'c'] }}"), output="{{ steps.m.output }}")
    _, states = settle(wf, {}, initial_states(wf))
    for index in (2, 0, 1):
        states = succeed(states, ("m", index), f"out-{index}")
    plan = advance(wf, {}, states)
    assert plan.completed == [(("m", None), ["out-0", "out-1", "out-2"])]
    assert plan.run_status == "succeeded"
    assert plan.run_output == ["out-0", "out-1", "out-2"]


def test_an_empty_map_completes_at_once_and_its_dependents_start():
    wf = definition(map_step("m", "{{ input.docs }}"), llm("after_map", "n={{ steps.m.output }}"))
    plan, _ = settle(wf, {"docs": []}, initial_states(wf))
    assert plan.expanded == []
    assert plan.completed == [(("m", None), [])]
    assert step_ready(plan, ("after_map", None)).input == {"prompt": "n=[]"}


def test_a_failed_item_fails_the_map_and_cancels_the_other_items():
    wf = definition(map_step("m", "{{ [1, 2, 3, 4] }}", max_parallel=2))
    _, states = settle(wf, {}, initial_states(wf))
    states = succeed(states, ("m", 0), "ok")
    plan = advance(wf, {}, fail(states, ("m", 1), "tool exploded"))
    assert plan.failed == [(("m", None), "item 1 failed: tool exploded")]
    assert plan.cancelled == [("m", 2), ("m", 3)]
    assert plan.run_error == "step 'm' failed: item 1 failed: tool exploded"


def test_an_optional_maps_item_failure_lets_the_run_continue():
    wf = definition(
        map_step("m", "{{ [1, 2] }}", optional=True),
        llm("b", "{{ steps.m.output }}|{{ steps.m.status }}"),
    )
    _, states = settle(wf, {}, initial_states(wf))
    plan, states = settle(wf, {}, fail(states, ("m", 0), "boom"))
    assert plan.failed == [(("m", None), "item 0 failed: boom")]
    assert plan.cancelled == [("m", 1)]
    assert plan.run_status is None
    assert step_ready(plan, ("b", None)).input == {"prompt": "|failed"}


def test_over_that_is_not_a_list_fails_the_map():
    wf = definition(map_step("m", "{{ input.docs }}"))
    plan = advance(wf, {"docs": {"a": 1}}, initial_states(wf))
    assert plan.failed == [(("m", None), "over of step 'm' must be a list, got an object")]


def test_a_map_over_a_skipped_steps_output_fails():
    wf = definition(llm("a", when="false"), map_step("m", "{{ steps.a.output }}", optional=True))
    plan = advance(wf, {}, initial_states(wf))
    assert plan.skipped == [("a", None)]
    assert plan.failed == [(("m", None), "over of step 'm' must be a list, got null")]
    assert plan.run_status == "succeeded"


def test_over_that_does_not_render_fails_the_map():
    wf = definition(map_step("m", "{{ input.n / 0 }}"))
    plan = advance(wf, {"n": 1}, initial_states(wf))
    assert plan.failed == [
        (("m", None), "over of step 'm' could not be rendered: ZeroDivisionError: division by zero")
    ]


def test_an_item_that_does_not_render_fails_the_map_naming_the_item_and_field():
    wf = definition(map_step("m", "{{ [1, 0] }}", "{{ 10 / item }}"))
    plan = advance(wf, {}, initial_states(wf))
    assert plan.expanded == [] and plan.ready == []
    assert plan.failed == [
        (
            ("m", None),
            "item 1 failed: prompt of step 'm' item 1 could not be rendered: "
            "ZeroDivisionError: division by zero",
        )
    ]


def test_an_item_that_does_not_render_later_fails_the_map_without_making_others_ready():
    wf = definition(map_step("m", "{{ [1, 2, 0] }}", "{{ 10 / item }}", max_parallel=1))
    _, states = settle(wf, {}, initial_states(wf))
    states = succeed(states, ("m", 0), 1)
    plan, states = settle(wf, {}, states)
    assert ready_keys(plan) == [("m", 1)]
    plan = advance(wf, {}, succeed(states, ("m", 1), 2))
    assert plan.ready == []
    assert [key for key, _ in plan.failed] == [("m", None)]
    assert plan.failed[0][1].startswith("item 2 failed: prompt of step 'm' item 2")
    assert plan.cancelled == [("m", 2)]


def test_map_item_inputs_see_the_maps_dependencies():
    wf = definition(
        llm("a"),
        map_step("m", "{{ [1, 2] }}", "{{ steps.a.output }}-{{ item }}"),
    )
    _, states = settle(wf, {}, initial_states(wf))
    plan = advance(wf, {}, succeed(states, ("a", None), "A"))
    assert [ready.input for ready in plan.ready] == [{"prompt": "A-1"}, {"prompt": "A-2"}]


# --- the end of a run -------------------------------------------------------------------------


def test_a_run_succeeds_when_every_step_is_finished_and_renders_its_output():
    wf = definition(
        llm("a"),
        llm("b", when="false"),
        output={"text": "{{ steps.a.output.text }}", "b": "{{ steps.b.output }}", "n": 1},
    )
    plan, states = settle(wf, {}, initial_states(wf))
    plan = advance(wf, {}, succeed(states, ("a", None), {"text": "hi"}))
    assert plan.is_empty()
    assert plan.run_status == "succeeded"
    assert plan.run_output == {"text": "hi", "b": None, "n": 1}


def test_a_run_without_output_succeeds_with_none():
    wf = definition(llm("a"))
    plan = advance(wf, {}, {("a", None): StepState(StepStatus.SUCCEEDED, output="x")})
    assert (plan.run_status, plan.run_output, plan.run_error) == ("succeeded", None, None)


def test_an_output_that_does_not_render_fails_the_run():
    wf = definition(llm("a"), output={"x": ["ok", "{{ steps.a.output / 0 }}"]})
    plan = advance(wf, {}, {("a", None): StepState(StepStatus.SUCCEEDED, output=1)})
    assert plan.run_status == "failed"
    assert plan.run_error == (
        "output.x[1] could not be rendered: ZeroDivisionError: division by zero"
    )


def test_a_run_whose_steps_are_all_skipped_succeeds():
    wf = definition(llm("a", when="false"), llm("b", when="false", after=["a"]))
    plan = advance(wf, {}, initial_states(wf))
    assert plan.skipped == [("a", None), ("b", None)]
    assert plan.run_status == "succeeded"


# --- apply ------------------------------------------------------------------------------------


def test_apply_writes_every_list_of_a_plan():
    states = {
        ("a", None): StepState(StepStatus.PENDING),
        ("b", None): StepState(StepStatus.PENDING),
        ("m", None): StepState(StepStatus.PENDING),
        ("e", None): StepState(StepStatus.RUNNING),
        ("f", None): StepState(StepStatus.PENDING),
        ("g", None): StepState(StepStatus.RUNNING, output="partial"),
    }
    plan = Plan(
        ready=[ReadyStep(("a", None), "llm", "steps.llm", {}), ReadyStep(("m", 0), "llm", "q", {})],
        skipped=[("b", None)],
        expanded=[("m", ["x", "y"])],
        completed=[(("e", None), [1])],
        failed=[(("f", None), "bad")],
        cancelled=[("g", None)],
    )
    assert apply(states, plan) == {
        ("a", None): StepState(StepStatus.READY),
        ("b", None): StepState(StepStatus.SKIPPED),
        ("m", None): StepState(StepStatus.RUNNING),
        ("m", 0): StepState(StepStatus.READY),
        ("m", 1): StepState(StepStatus.PENDING),
        ("e", None): StepState(StepStatus.SUCCEEDED, output=[1]),
        ("f", None): StepState(StepStatus.FAILED, error="bad"),
        ("g", None): StepState(StepStatus.CANCELLED, output="partial"),
    }
    assert states[("a", None)] == StepState(StepStatus.PENDING)  # the input is not modified


def test_an_empty_plan_is_empty():
    assert Plan().is_empty()
    assert not Plan(skipped=[("a", None)]).is_empty()
    assert Plan(run_status="succeeded").is_empty()


# --- the support-triage example end to end ----------------------------------------------------


def test_the_support_triage_example_runs_to_its_output():
    registry.register_tool("crm.lookup")(lambda ctx, **args: args)
    wf = parse_definition(
        {
            "name": "support-triage",
            "steps": [
                {"id": "classify", "kind": "llm", "prompt": "Label: {{ input.ticket }}"},
                {"id": "search", "kind": "retrieval", "query": "{{ input.ticket }}"},
                {
                    "id": "account",
                    "kind": "tool",
                    "tool": "crm.lookup",
                    "args": {"email": "{{ input.email }}"},
                },
                {
                    "id": "review",
                    "kind": "approval",
                    "after": ["classify"],
                    "when": "steps.classify.output.text == 'refund'",
                    "prompt": "Refund requested: {{ input.ticket }}",
                },
                {
                    "id": "per_doc",
                    "kind": "map",
                    "over": "{{ steps.search.output.documents }}",
                    "step": {"kind": "llm", "prompt": "Summarise: {{ item.text }}"},
                    "max_parallel": 4,
                },
                {
                    "id": "draft",
                    "kind": "llm",
                    "after": ["per_doc", "account", "review"],
                    "prompt": "Reply using {{ steps.per_doc.output }}",
                },
            ],
            "output": "{{ steps.draft.output.text }}",
        }
    )
    run_input = {"ticket": "where is my parcel", "email": "a@example.com"}
    plan, states = settle(wf, run_input, initial_states(wf))
    assert ready_keys(plan) == [("classify", None), ("search", None), ("account", None)]
    assert step_ready(plan, ("account", None)).input == {
        "tool": "crm.lookup",
        "args": {"email": "a@example.com"},
    }
    states = succeed(states, ("classify", None), {"text": "shipping"})
    states = succeed(states, ("search", None), {"documents": [{"text": "d0"}, {"text": "d1"}]})
    states = succeed(states, ("account", None), {"name": "Ann"})
    plan, states = settle(wf, run_input, states)
    assert plan.skipped == [("review", None)]
    assert plan.expanded == [("per_doc", [{"text": "d0"}, {"text": "d1"}])]
    assert [ready.input for ready in plan.ready] == [
        {"prompt": "Summarise: d0"},
        {"prompt": "Summarise: d1"},
    ]
    states = succeed(states, ("per_doc", 1), "s1")
    states = succeed(states, ("per_doc", 0), "s0")
    plan, states = settle(wf, run_input, states)
    assert plan.completed == [(("per_doc", None), ["s0", "s1"])]
    assert step_ready(plan, ("draft", None)).input == {"prompt": 'Reply using ["s0", "s1"]'}
    plan = advance(wf, run_input, succeed(states, ("draft", None), {"text": "Dear Ann"}))
    assert (plan.run_status, plan.run_output) == ("succeeded", "Dear Ann")
