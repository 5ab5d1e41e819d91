"""Maps (fan-out / fan-in) and sub-workflows through the real scheduler and workers."""

from __future__ import annotations

import pytest

from jobs.models import Run, StepRun
from jobs.services.workflows import workflow_version_create
from tests.support.workflows import submit, tool_step

pytestmark = pytest.mark.cluster


def test_a_map_fans_out_within_max_parallel_and_fans_in_in_order(owner, running):
    run = submit(
        owner.tenant,
        {
            "name": "fanout",
            "input_schema": {"type": "object", "properties": {"items": {"type": "array"}}},
            "steps": [
                {
                    "id": "each",
                    "kind": "map",
                    "over": "{{ input['items'] }}",
                    "max_parallel": 2,
                    "step": {
                        "kind": "tool",
                        "tool": "test.count",
                        "args": {"key": "item{{ index }}", "value": "{{ item }}", "sleep_ms": 300},
                    },
                }
            ],
            "output": "{{ steps.each.output | map(attribute='extra.value') | list }}",
        },
        {"items": ["a", "b", "c", "d", "e"]},
    )

    run = running.wait_run(run, timeout=60)

    assert run.status == "succeeded", run.error
    assert run.output == ["a", "b", "c", "d", "e"]
    items = list(StepRun.objects.filter(run=run, map_index__isnull=False).order_by("map_index"))
    assert [item.map_index for item in items] == [0, 1, 2, 3, 4]
    for item in items:  # never more than two items running at any instant: at each start
        running = [
            other for other in items if other.started_at <= item.started_at < other.finished_at
        ]
        assert len(running) <= 2, [(o.map_index, o.started_at, o.finished_at) for o in running]


def test_a_workflow_step_runs_a_child_run_and_waits_for_it(owner, running):
    workflow_version_create(
        tenant=owner.tenant,
        document={
            "name": "child",
            "input_schema": {"type": "object", "required": ["n"]},
            "steps": [
                tool_step(
                    "work", "test.count", args={"key": "child{{ input.n }}", "n": "{{ input.n }}"}
                )
            ],
            "output": {"doubled": "{{ steps.work.output.extra.n * 2 }}"},
        },
    )
    parent = submit(
        owner.tenant,
        {
            "name": "parent",
            "steps": [
                {"id": "sub", "kind": "workflow", "workflow": "child", "input": {"n": 21}},
                tool_step(
                    "after",
                    "test.count",
                    after=["sub"],
                    args={"key": "after", "got": "{{ steps.sub.output.doubled }}"},
                ),
            ],
            "output": "{{ steps.after.output.extra.got }}",
        },
    )

    parent = running.wait_run(parent, timeout=60)

    assert parent.status == "succeeded", parent.error
    assert parent.output == 42
    child = Run.objects.get(parent_step__run=parent)
    assert child.status == "succeeded" and child.output == {"doubled": 42}
    assert child.tenant == owner.tenant


def test_a_failed_child_run_fails_the_parent_step(owner, running):
    workflow_version_create(
        tenant=owner.tenant,
        document={
            "name": "broken-child",
            "steps": [tool_step("boom", "test.fail", args={"key": "boom", "retryable": False})],
        },
    )
    parent = submit(
        owner.tenant,
        {
            "name": "parent2",
            "steps": [{"id": "sub", "kind": "workflow", "workflow": "broken-child"}],
        },
    )
    parent = running.wait_run(parent, timeout=60)
    assert parent.status == "failed"
    assert "child run" in parent.error and "failed on purpose" in parent.error


def test_cancelling_a_parent_cancels_its_waiting_child(owner, running, ledger):
    from jobs.transitions.runs import run_cancel

    workflow_version_create(
        tenant=owner.tenant,
        document={
            "name": "slow-child",
            "steps": [
                tool_step("wait", "test.block_first", args={"key": "slowchild", "block_s": 30})
            ],
        },
    )
    parent = submit(
        owner.tenant,
        {
            "name": "parent3",
            "steps": [{"id": "sub", "kind": "workflow", "workflow": "slow-child"}],
        },
    )
    running.wait_until(lambda: (ledger / "slowchild.pid").exists(), 30, "child never started")
    run_cancel(run=parent, reason="test")
    child = Run.objects.get(parent_step__run=parent)
    running.wait_until(
        lambda: Run.objects.get(pk=child.pk).status == "cancelled",
        30,
        "the child was not cancelled",
    )
