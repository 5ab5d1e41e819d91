"""The dashboard's figures and actions against real RabbitMQ, scheduler and Celery workers:
queue depth as RabbitMQ holds it, workers from their own heartbeats (threads and prefork),
a killed worker marked down, and retry / re-run / bulk retry / pause through the pages, with
the ledger proving which steps ran again."""

from __future__ import annotations

import time
import uuid

import pytest
from django.utils import timezone
from kombu import Connection, Producer

from dashboard import health
from dashboard.models import MetricCounter, MetricSample
from dashboard.sampling import labels_key
from jobs.models import Event, RunStatus, StepRun, StepStatus
from orchestrator.queues import broker_queue
from tests.support.dashboard import ledger_chain, make_operator, signed_in
from tests.support.tools import calls
from tests.support.workflows import submit

QUEUES = ("steps.llm", "steps.tool", "steps.retrieval", "steps.control", "webhooks", "maintenance")


def use_prefix(settings, prefix: str) -> None:
    """Make this process's dashboard read the broker queues of `prefix` (a cluster's)."""
    settings.SWITCHYARD_QUEUE_PREFIX = prefix
    settings.CELERY_TASK_QUEUES = [broker_queue(name, prefix) for name in QUEUES]


@pytest.fixture
def dash(cluster, settings):
    """A cluster whose processes heartbeat twice a second and sample metrics every second;
    this process reads its queues and calls a worker down after 3 s of silence."""
    cluster.env.update(SWITCHYARD_WORKER_HEARTBEAT_S="0.5", SWITCHYARD_METRICS_SAMPLE_S="1")
    use_prefix(settings, cluster.prefix)
    settings.SWITCHYARD_WORKER_DOWN_AFTER_S = 3
    return cluster


@pytest.fixture
def staff(transactional_db):
    return signed_in(make_operator("olga"))


def worker_named(prefix: str) -> health.WorkerFigure | None:
    return next((w for w in health.workers() if w.name.startswith(prefix)), None)


# --- figures ------------------------------------------------------------------------------


def test_queue_depth_is_what_rabbitmq_holds(db, settings):
    prefix = f"t{uuid.uuid4().hex[:8]}."
    use_prefix(settings, prefix)
    queue = broker_queue("steps.tool", prefix)
    with Connection(settings.CELERY_BROKER_URL) as conn:
        channel = conn.channel()
        try:
            producer = Producer(channel)
            queue(channel).declare()
            for number in range(7):
                producer.publish(
                    {"n": number}, exchange=queue.exchange, routing_key=queue.routing_key
                )
            time.sleep(0.2)

            figures = {q.name: q for q in health.broker_queues()}

            assert figures["steps.tool"].depth == 7
            assert figures["steps.tool"].consumers == 0 and figures["steps.tool"].exists
            assert figures["steps.llm"].depth == 0 and not figures["steps.llm"].exists
            assert figures["steps.tool"].broker_name == f"{prefix}steps.tool"
        finally:
            queue(channel).delete()
            queue.exchange(channel).delete()


def test_queue_depth_says_unknown_when_rabbitmq_is_unreachable(db, settings):
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:1//"
    figures = health.broker_queues()
    assert figures and all(not q.reachable and q.depth is None for q in figures)
    ok_by_name = {h.name: h.ok for h in health.health(figures, [])}
    assert ok_by_name["RabbitMQ"] is False and ok_by_name["PostgreSQL"] is True


def test_workers_are_listed_from_their_own_heartbeats_with_what_they_run(owner, dash):
    dash.start_scheduler()
    dash.start_worker("steps.llm", pool="threads", concurrency=3, name="llm-a")
    dash.start_worker("steps.tool", pool="prefork", concurrency=2, name="tool-b")

    llm = dash.wait_until(lambda: worker_named("llm-a@"), 20, "llm-a never heartbeated")
    tool = dash.wait_until(lambda: worker_named("tool-b@"), 20, "tool-b never heartbeated")
    assert (llm.pool, llm.concurrency, llm.queue_names, llm.state) == (
        "threads", 3, ["steps.llm"], "up"
    )  # fmt: skip
    assert (tool.pool, tool.concurrency, tool.queue_names, tool.state) == (
        "prefork", 2, ["steps.tool"], "up"
    )  # fmt: skip
    queues = {q.name: q for q in health.broker_queues()}
    assert queues["steps.tool"].consumers == 1 and queues["steps.llm"].consumers == 1
    scheduler = dash.wait_until(
        lambda: (h := health.scheduler_health(timezone.now())).ok and h, 20, "no cycle seen"
    )
    assert scheduler.detail.startswith("last cycle ") and scheduler.latency_ms is not None

    run = submit(
        owner.tenant,
        {
            "name": "slow",
            "steps": [
                {"id": "nap", "kind": "tool", "tool": "test.count",
                 "args": {"key": "nap", "sleep_ms": 2500}},
            ],
        },
    )  # fmt: skip

    busy = dash.wait_until(
        lambda: (w := worker_named("tool-b@")) and w.current and w, 20, "nap never ran"
    )
    assert [(s.run_id, s.step) for s in busy.current] == [(run.public_id, "nap")]
    dash.wait_run(run)
    done = dash.wait_until(
        lambda: (w := worker_named("tool-b@")) and w.succeeded == 1 and w, 20, "not counted"
    )
    assert done.current == [] and done.failed == 0


def test_a_killed_worker_is_marked_down_within_30_seconds(owner, dash):
    proc = dash.start_worker("steps.tool", pool="threads", concurrency=2, name="doomed")
    dash.wait_until(
        lambda: (w := worker_named("doomed@")) and w.state == "up", 20, "doomed never came up"
    )

    dash.kill(proc)
    killed_at = time.monotonic()

    dash.wait_until(
        lambda: worker_named("doomed@").state == "down", 30, "the killed worker is not down"
    )
    assert time.monotonic() - killed_at < 30
    by_name = {h.name: h for h in health.health(health.broker_queues(), health.workers())}
    assert by_name["pool steps.tool"].ok is False


# --- actions through the pages ---------------------------------------------------------------


def flaky_then_count(name: str, key: str) -> dict:
    """prepare (count) → flaky (fails its first call, one attempt per try) → finish (count)."""
    return {
        "name": name,
        "input_schema": {"type": "object", "properties": {"key": {"type": "string"}}},
        "steps": [
            {"id": "prepare", "kind": "tool", "tool": "test.count",
             "args": {"key": f"{key}-prepare-{{{{ input.key }}}}"}},
            {"id": "flaky", "kind": "tool", "tool": "test.flaky", "after": ["prepare"],
             "retry": {"max_attempts": 1},
             "args": {"key": f"{key}-flaky-{{{{ input.key }}}}", "fail_times": 1}},
            {"id": "finish", "kind": "tool", "tool": "test.count", "after": ["flaky"],
             "args": {"key": f"{key}-finish-{{{{ input.key }}}}"}},
        ],
    }  # fmt: skip


@pytest.fixture
def tools(dash):
    dash.start_scheduler()
    dash.start_worker("steps.tool", pool="threads", concurrency=4)
    return dash


def test_retry_from_the_run_page_runs_only_the_failed_steps_again(owner, tools, staff):
    run = submit(owner.tenant, flaky_then_count("retryable", "r"), {"key": "1"})
    tools.wait_run(run)
    assert run.status == RunStatus.FAILED

    response = staff.post(f"/dashboard/runs/{run.public_id}/retry/")

    assert response.status_code == 302
    tools.wait_run(run)
    assert run.status == RunStatus.SUCCEEDED
    assert (len(calls("r-prepare-1")), len(calls("r-flaky-1")), len(calls("r-finish-1"))) == (
        1,
        2,
        1,
    )
    assert Event.objects.get(run=run, type="run.retried").data["by"] == "operator:olga"


def test_re_run_from_a_step_keeps_what_came_before(owner, tools, staff):
    run = submit(owner.tenant, ledger_chain("three", "rr", "extract", "summarise", "publish"))
    tools.wait_run(run)
    assert run.status == RunStatus.SUCCEEDED
    extract_output = StepRun.objects.get(run=run, step_id="extract").output

    response = staff.post(f"/dashboard/runs/{run.public_id}/rerun/", {"step": "summarise"})

    assert response.status_code == 302
    tools.wait_run(run)
    assert run.status == RunStatus.SUCCEEDED
    assert [len(calls(f"rr-{s}")) for s in ("extract", "summarise", "publish")] == [1, 2, 2]
    assert StepRun.objects.get(run=run, step_id="extract").output == extract_output
    assert StepRun.objects.get(run=run, step_id="publish").output["call"] == 2
    rerun = Event.objects.get(run=run, type="run.rerun")
    assert rerun.data == {
        "by": "operator:olga",
        "from": "summarise",
        "steps_reset": ["summarise", "publish"],
        "map_items_deleted": 0,
    }


def test_bulk_retry_of_a_filter_retries_exactly_the_runs_that_match(owner, outsider, tools, staff):
    mine = [
        submit(owner.tenant, flaky_then_count("batchy", "b"), {"key": str(i)}) for i in range(3)
    ]
    theirs = submit(outsider.tenant, flaky_then_count("batchy", "o"), {"key": "x"})
    for run in [*mine, theirs]:
        tools.wait_run(run)
        assert run.status == RunStatus.FAILED

    confirm = staff.get("/dashboard/runs/bulk/?action=retry&tenant=owner&workflow=batchy")
    assert "This will retry <b>3</b> runs" in " ".join(confirm.content.decode().split())
    staff.post(
        "/dashboard/runs/bulk/", {"action": "retry", "tenant": "owner", "workflow": "batchy"}
    )

    for run in mine:
        tools.wait_run(run)
        assert run.status == RunStatus.SUCCEEDED
    theirs.refresh_from_db()
    assert theirs.status == RunStatus.FAILED
    assert [len(calls(f"b-prepare-{i}")) for i in range(3)] == [1, 1, 1]


def test_pause_holds_a_tenants_steps_and_resume_releases_them(owner, tools, staff):
    staff.post(f"/dashboard/tenants/{owner.tenant.slug}/pause/")
    run = submit(owner.tenant, ledger_chain("held", "p", "only"))
    time.sleep(1.5)
    assert StepRun.objects.get(run=run).status == StepStatus.READY
    assert calls("p-only") == []

    staff.post(f"/dashboard/tenants/{owner.tenant.slug}/resume/")

    tools.wait_run(run)
    assert run.status == RunStatus.SUCCEEDED and len(calls("p-only")) == 1


# --- the sampler, /metrics and logs -------------------------------------------------------------


def test_the_scheduler_samples_charts_and_counters_that_metrics_exposes(owner, tools, settings):
    settings.SWITCHYARD_METRICS_TOKEN = "scrape-me"
    runs = [submit(owner.tenant, ledger_chain("sampled", f"s{i}", "one", "two")) for i in range(3)]
    for run in runs:
        tools.wait_run(run)

    def counted() -> float:
        labels = labels_key(kind="tool", outcome="succeeded")
        row = MetricCounter.objects.filter(name="step_attempts_total", labels=labels).first()
        return row.value if row else 0

    tools.wait_until(lambda: counted() == 6, 20, "the sampler did not count 6 attempts")
    assert MetricSample.objects.filter(metric="completed_per_min", value__gt=0).exists()
    assert MetricSample.objects.filter(metric="queue_depth", key="steps.tool").exists()
    assert MetricSample.objects.filter(metric="backlog", key="interactive").exists()

    from django.test import Client

    body = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-me").content.decode()
    assert 'switchyard_step_attempts_total{kind="tool",outcome="succeeded"} 6.0' in body
    assert 'switchyard_step_duration_seconds_count{kind="tool"} 6.0' in body
    assert 'switchyard_queue_wait_seconds_count{lane="standard",tenant="owner"} 6.0' in body
    assert 'switchyard_queue_depth{queue="steps.tool"} 0.0' in body
    assert 'switchyard_workers{state="up"} 1.0' in body

    worker_log = next(p for p in tools.procs if p.name.startswith("tool")).log()
    assert f"run={runs[0].public_id} step=one" in worker_log
