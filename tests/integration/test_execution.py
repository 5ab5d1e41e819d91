"""The durable engine end to end: real PostgreSQL, RabbitMQ, scheduler and worker processes."""

from __future__ import annotations

import os
import signal
import time

import pytest

from jobs import templating
from jobs.definitions import parse_definition
from jobs.demo import DEMO_DOCUMENTS, SUPPORT_TRIAGE
from jobs.models import AttemptOutcome, Event, StepAttempt, StepRun
from jobs.services.documents import documents_add
from tests.support import tools
from tests.support.workflows import assert_gapless, event_types, submit, tool_step

pytestmark = pytest.mark.cluster


def _steps(run) -> dict[str, StepRun]:
    return {step.key: step for step in StepRun.objects.filter(run=run)}


def test_the_demo_workflow_succeeds_with_a_gapless_log_and_the_rendered_output(owner, running):
    documents_add(tenant=owner.tenant, documents=DEMO_DOCUMENTS)
    run = submit(
        owner.tenant,
        SUPPORT_TRIAGE,
        {"ticket": "I want a refund for my invoice", "email": "ann@example.com"},
    )

    run = running.wait_run(run, timeout=60)

    assert run.status == "succeeded", run.error
    assert_gapless(run)
    steps = _steps(run)
    assert {key: step.status for key, step in steps.items() if step.map_index is None} == {
        "classify": "succeeded",
        "search": "succeeded",
        "account": "succeeded",
        "per_doc": "succeeded",
        "flag_refund": "succeeded" if steps["classify"].output["text"] == "refund" else "skipped",
        "draft": "succeeded",
    }
    found = steps["search"].output["documents"]
    assert found and found[0]["title"] == "Refund policy"
    assert len(steps["per_doc"].output) == len(found)
    context = {
        "input": run.input,
        "steps": {
            s.step_id: {"output": s.output if s.status == "succeeded" else None}
            for s in steps.values()
            if s.map_index is None
        },
    }
    expected = templating.render(parse_definition(SUPPORT_TRIAGE).output, context)
    assert run.output == expected
    assert run.output["reply"].startswith("[simulated")
    types = event_types(run)
    assert types[0] == "run.accepted" and types[-1] == "run.succeeded"


@pytest.mark.flaky(reruns=1)
def test_independent_steps_run_in_parallel(owner, running):
    slow = {"provider": "simulated", "simulated": {"latency_ms": 1000}}
    run = submit(
        owner.tenant,
        {
            "name": "parallel",
            "steps": [
                {"id": "a", "kind": "llm", "prompt": "one", **slow},
                {"id": "b", "kind": "llm", "prompt": "two", **slow},
            ],
        },
    )
    run = running.wait_run(run, timeout=30)
    assert run.status == "succeeded"
    a, b = _steps(run)["a"], _steps(run)["b"]
    # Each took ~1 s; their running intervals overlap, so together they took ~1 s, not 2.
    assert a.started_at < b.finished_at and b.started_at < a.finished_at
    assert (run.finished_at - run.started_at).total_seconds() < 1.9


def test_a_step_that_fails_twice_then_succeeds_is_retried_alone(owner, running):
    run = submit(
        owner.tenant,
        {
            "name": "flaky",
            "steps": [
                tool_step("before", "test.count", args={"key": "before"}),
                tool_step(
                    "flaky",
                    "test.flaky",
                    after=["before"],
                    args={"key": "flaky", "fail_times": 2},
                    retry={"max_attempts": 4, "backoff_s": 0.1},
                ),
                tool_step("after", "test.count", after=["flaky"], args={"key": "after"}),
            ],
        },
    )
    run = running.wait_run(run, timeout=60)
    assert run.status == "succeeded", run.error
    flaky = _steps(run)["flaky"]
    assert flaky.attempt == 3
    assert [a.outcome for a in flaky.attempts.all()] == ["failed", "failed", "succeeded"]
    assert flaky.output == {"succeeded_on_call": 3}
    assert len(tools.calls("before")) == 1
    assert len(tools.calls("after")) == 1
    assert event_types(run).count("step.retrying") == 2


def test_a_killed_worker_loses_no_step(owner, running, ledger):
    run = submit(
        owner.tenant,
        {
            "name": "killed",
            "steps": [
                tool_step("first", "test.count", args={"key": "first"}),
                tool_step(
                    "victim",
                    "test.block_first",
                    after=["first"],
                    args={"key": "victim", "block_s": 120},
                ),
                tool_step("last", "test.count", after=["victim"], args={"key": "last"}),
            ],
        },
    )
    pid_file = ledger / "victim.pid"
    running.wait_until(pid_file.exists, 30, "the victim step never started")
    victim_pid = int(pid_file.read_text())
    os.kill(victim_pid, signal.SIGKILL)

    run = running.wait_run(run, timeout=60)

    assert run.status == "succeeded", run.error
    victim = _steps(run)["victim"]
    assert victim.output["call"] == 2 and victim.output["pid"] != victim_pid
    assert [a.outcome for a in victim.attempts.all()] == [AttemptOutcome.LOST, "succeeded"]
    assert len(tools.calls("first")) == 1
    assert len(tools.calls("last")) == 1


def test_a_stopped_scheduler_resumes_the_backlog_and_purged_queues_are_redispatched(
    owner, cluster, scheduler_only
):
    cluster.start_all_pools()
    definition = {
        "name": "resume",
        "steps": [tool_step(f"s{i}", "test.count", args={"key": f"s{i}"}) for i in range(3)]
        + [tool_step("end", "test.count", after=["s0", "s1", "s2"], args={"key": "end"})],
    }
    run = submit(owner.tenant, definition)
    time.sleep(1)  # no scheduler: nothing may run
    assert set(StepRun.objects.filter(run=run).values_list("status", flat=True)) == {
        "ready",
        "pending",
    }
    cluster.start_scheduler()
    run = cluster.wait_run(run, timeout=60)
    assert run.status == "succeeded"

    # Now steps queued in RabbitMQ with no consumer: purge them, the scheduler re-dispatches.
    tool_worker = next(p for p in cluster.procs if p.name.startswith("tool"))
    cluster.stop(tool_worker)
    run = submit(owner.tenant, {**definition, "name": "purged"})
    cluster.wait_until(lambda: cluster.depth("steps.tool") >= 3, 30, "steps never queued")
    assert cluster.purge("steps.tool") >= 3
    cluster.start_worker("steps.tool", pool="prefork", concurrency=2)
    run = cluster.wait_run(run, timeout=60)
    assert run.status == "succeeded"
    assert "step.redispatched" in event_types(run)
    for i in range(3):
        assert len(tools.calls(f"s{i}")) == 2  # once per run: the purge lost no step


def test_two_schedulers_never_dispatch_a_step_twice(owner, cluster):
    cluster.start_scheduler("scheduler-a")
    cluster.start_scheduler("scheduler-b")
    cluster.start_worker("steps.tool", pool="prefork", concurrency=2)
    runs = [
        submit(
            owner.tenant,
            {
                "name": f"race{n}",
                "steps": [
                    tool_step(f"s{i}", "test.count", args={"key": f"r{n}s{i}"}) for i in range(5)
                ],
            },
        )
        for n in range(8)
    ]
    for run in runs:
        assert cluster.wait_run(run, timeout=90).status == "succeeded"
    for n in range(8):
        for i in range(5):
            assert len(tools.calls(f"r{n}s{i}")) == 1, f"r{n}s{i} ran more than once"
    assert Event.objects.filter(type="step.queued").count() == 40


def test_a_worker_paused_past_its_lease_has_its_late_result_refused(owner, cluster, ledger):
    cluster.start_scheduler()
    cluster.start_worker("steps.tool", pool="prefork", concurrency=2)
    run = submit(
        owner.tenant,
        {
            "name": "paused",
            "steps": [
                tool_step(
                    "slow",
                    "test.block_first",
                    args={"key": "slow", "block_s": 4},
                    timeout_s=2,
                    retry={"max_attempts": 3, "backoff_s": 0.1},
                ),
            ],
        },
    )
    pid_file = ledger / "slow.pid"
    cluster.wait_until(pid_file.exists, 30, "the step never started")
    paused_pid = int(pid_file.read_text())
    os.kill(paused_pid, signal.SIGSTOP)
    try:
        run = cluster.wait_run(run, timeout=60)
    finally:
        os.kill(paused_pid, signal.SIGCONT)

    assert run.status == "succeeded"
    slow = _steps(run)["slow"]
    assert slow.output["call"] == 2 and slow.output["pid"] != paused_pid
    first = slow.attempts.get(number=1)
    cluster.wait_until(
        lambda: StepAttempt.objects.get(pk=first.pk).outcome == AttemptOutcome.REFUSED,
        30,
        "the late result was never reported (or was accepted)",
    )
    slow.refresh_from_db()
    assert slow.output["call"] == 2
    # The run had ended: its log still ends with its final event, so streams end there.
    assert list(run.events.order_by("seq").values_list("type", flat=True))[-1] == "run.succeeded"


def test_a_poison_step_fails_after_its_attempts_and_the_pool_keeps_serving(owner, running):
    poison = submit(
        owner.tenant,
        {
            "name": "poison",
            "steps": [
                tool_step("pill", "test.kill_self", args={"key": "pill"}, retry={"max_attempts": 2})
            ],
        },
    )
    poison = running.wait_run(poison, timeout=90)
    assert poison.status == "failed"
    assert "lost on each of its 2 attempts" in poison.error
    assert len(tools.calls("pill")) == 2

    healthy = submit(
        owner.tenant,
        {
            "name": "healthy",
            "steps": [tool_step("ok", "test.count", args={"key": "ok"})],
        },
    )
    assert running.wait_run(healthy, timeout=60).status == "succeeded"
