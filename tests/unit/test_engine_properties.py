"""Property tests of the engine: random workflows, driven to the end by a random scheduler.

Each example builds a random DAG (1-25 steps, edges only to earlier steps, through `after` or
through a template reference, random `when` constants, optional steps, maps of 0-5 items),
then plays a run: advance, apply, and let a random subset of the active steps start, succeed
or fail, until the run has a status.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.definitions import Definition, parse_definition
from jobs.engine import (
    Plan,
    StepKey,
    StepState,
    advance,
    apply,
    initial_states,
)
from jobs.statuses import STEP_ACTIVE, STEP_FINAL, StepStatus

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def workflows(draw) -> tuple[dict[str, Any], dict[str, Any]]:
    """A workflow document and a run input (the lists its maps iterate over)."""
    count = draw(st.integers(1, 25))
    steps = []
    lists: dict[str, list[int]] = {}
    for index in range(count):
        step_id = f"s{index}"
        earlier = [f"s{i}" for i in range(index)]
        after = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3)) if earlier else []
        # Sometimes a dependency only through a template, not `after`.
        read = draw(st.sampled_from(earlier)) if earlier and draw(st.booleans()) else None
        prompt = f"{step_id} sees {{{{ steps.{read}.output }}}}" if read else f"{step_id}"
        step: dict[str, Any]
        if draw(st.integers(0, 3)) == 0:
            lists[step_id] = list(range(draw(st.integers(0, 5))))
            step = {
                "id": step_id,
                "kind": "map",
                "over": f"{{{{ input.lists.{step_id} }}}}",
                "step": {"kind": "llm", "prompt": prompt + " item {{ index }}={{ item }}"},
                "max_parallel": draw(st.integers(1, 3)),
            }
        else:
            step = {"id": step_id, "kind": "llm", "prompt": prompt}
        if after:
            step["after"] = after
        when = draw(st.sampled_from([None, None, "true", "false"]))
        if when is not None:
            step["when"] = when
        if draw(st.booleans()):
            step["optional"] = True
        steps.append(step)
    return {"name": "random", "steps": steps}, {"lists": lists}


def plan_keys(plan: Plan) -> list[StepKey]:
    return [
        *(ready.key for ready in plan.ready),
        *plan.skipped,
        *((map_id, None) for map_id, _ in plan.expanded),
        *(key for key, _ in plan.completed),
        *(key for key, _ in plan.failed),
        *plan.cancelled,
    ]


def is_done(definition: Definition, states: dict[StepKey, StepState], step_id: str) -> bool:
    status = states[(step_id, None)].status
    optional = definition.step(step_id).optional
    return status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED) or (
        status in (StepStatus.FAILED, StepStatus.CANCELLED) and optional
    )


def is_map_row(definition: Definition, key: StepKey) -> bool:
    return key[1] is None and definition.step(key[0]).is_map


def output_of(key: StepKey) -> str:
    step_id, index = key
    return step_id if index is None else f"{step_id}:{index}"


@SETTINGS
@given(workflow=workflows(), data=st.data())
def test_random_runs_follow_the_rules_and_finish(workflow, data):
    document, run_input = workflow
    definition = parse_definition(document)

    # The definition lists steps in a topological order.
    seen: set[str] = set()
    for step in definition.steps:
        assert step.depends_on <= seen
        seen.add(step.id)

    states = initial_states(definition)
    made_ready: Counter[StepKey] = Counter()
    plan = Plan()
    for _ in range(1000):
        plan = advance(definition, run_input, states)
        keys = plan_keys(plan)
        assert len(keys) == len(set(keys)), f"a step is in two lists: {plan}"
        assert advance(definition, run_input, states) == plan, "advance is deterministic"
        states = apply(states, plan)

        for ready in plan.ready:
            made_ready[ready.key] += 1
            step_id, index = ready.key
            if index is None:
                step = definition.step(step_id)
                assert all(is_done(definition, states, dep) for dep in step.depends_on)
            else:
                assert states[(step_id, None)].status == StepStatus.RUNNING
                assert ready.input["prompt"].endswith(f"item {index}={index}")
        for map_id, items in plan.expanded:
            assert items == run_input["lists"][map_id]
        for step in definition.steps:
            if step.is_map:
                active = [k for k, s in states.items() if k[0] == step.id and k[1] is not None]
                active = [k for k in active if states[k].status in STEP_ACTIVE]
                assert len(active) <= step.max_parallel

        assert advance(definition, run_input, states).is_empty(), "apply then advance is a no-op"
        if plan.run_status is not None:
            break

        # The scheduler and the workers: start ready steps, finish running ones.
        # A running map is the engine's business, not the workers'.
        active = sorted(
            (
                k
                for k, s in states.items()
                if s.status in STEP_ACTIVE and not is_map_row(definition, k)
            ),
            key=str,
        )
        assert active, "the run is neither finished nor doing anything"
        for key in data.draw(st.lists(st.sampled_from(active), min_size=1, unique=True)):
            if states[key].status == StepStatus.READY and data.draw(st.booleans()):
                states[key] = StepState(StepStatus.RUNNING)
            elif data.draw(st.integers(0, 9)) == 0:
                states[key] = StepState(StepStatus.FAILED, error=f"{output_of(key)} broke")
            else:
                states[key] = StepState(StepStatus.SUCCEEDED, output=output_of(key))
    else:
        raise AssertionError("the run did not finish")

    # The run has a status and every step is finished.
    assert plan.run_status in ("succeeded", "failed")
    assert all(state.status in STEP_FINAL for state in states.values())
    final = advance(definition, run_input, states)
    assert final.is_empty()
    assert final.run_status == plan.run_status

    # Each step was made ready at most once, and exactly once if it ran.
    assert all(count == 1 for count in made_ready.values())
    for key, state in states.items():
        if state.status == StepStatus.SUCCEEDED and not is_map_row(definition, key):
            assert made_ready[key] == 1
        if state.status == StepStatus.SKIPPED:
            assert made_ready[key] == 0

    failed_required = [
        step.id
        for step in definition.steps
        if states[(step.id, None)].status == StepStatus.FAILED and not step.optional
    ]
    if plan.run_status == "succeeded":
        assert failed_required == []
        assert plan.run_output is None
        for step in definition.steps:
            status = states[(step.id, None)].status
            # `when` decides: false skips, true or absent runs.
            assert (status == StepStatus.SKIPPED) == (step.when == "false")
    else:
        assert len(failed_required) >= 1
        assert plan.run_error is not None

    # A map's output is its items' outputs in index order.
    for step in definition.steps:
        state = states[(step.id, None)]
        if step.is_map and state.status == StepStatus.SUCCEEDED:
            expected = [f"{step.id}:{i}" for i in range(len(run_input["lists"][step.id]))]
            assert state.output == expected


@SETTINGS
@given(workflow=workflows())
def test_a_run_where_every_step_succeeds_runs_exactly_the_steps_whose_when_holds(workflow):
    document, run_input = workflow
    definition = parse_definition(document)
    states = initial_states(definition)
    while True:
        plan = advance(definition, run_input, states)
        states = apply(states, plan)
        if plan.run_status is not None:
            break
        for key, state in list(states.items()):
            if state.status == StepStatus.READY:
                states[key] = StepState(StepStatus.SUCCEEDED, output=output_of(key))
    assert plan.run_status == "succeeded"
    for step in definition.steps:
        expected = StepStatus.SKIPPED if step.when == "false" else StepStatus.SUCCEEDED
        assert states[(step.id, None)].status == expected
