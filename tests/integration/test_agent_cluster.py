"""The agent loop under real processes killed for real: the scheduler, an llm worker and a
tool worker, with the `http` tool calling a real receiver on 127.0.0.1 (allowed by
SWITCHYARD_ALLOW_PRIVATE_URLS in the workers' environment) that counts every request."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs.models import Event, StepRun
from jobs.services.workflows import workflow_version_create
from jobs.transitions.runs import run_create
from tests.conftest import make_tenant_client
from tests.support.cluster import Cluster
from tests.support.workflows import assert_gapless, submit

pytestmark = pytest.mark.cluster


class Receiver:
    """Counts requests by path (and their Idempotency-Key); the first request to /slow waits
    until `release` is set, so that a tool worker can be killed in the middle of the call."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.answer()

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.answer()

            def answer(self):
                with receiver.lock:
                    receiver.requests.append((self.path, self.headers.get("Idempotency-Key")))
                    first_slow = [p for p, _ in receiver.requests].count("/slow") == 1
                if self.path == "/slow" and first_slow:
                    receiver.release.wait(60)
                body = b'{"ok": true, "path": "' + self.path.encode() + b'"}'
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the caller was killed

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self) -> Counter:
        with self.lock:
            return Counter(path for path, _ in self.requests)

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    found = Receiver()
    yield found
    found.close()


@pytest.fixture
def agent_cluster(transactional_db, tmp_path, ledger):
    harness = Cluster(tmp_path, ledger, SWITCHYARD_ALLOW_PRIVATE_URLS="true")
    try:
        yield harness
    finally:
        harness.stop_all()


def killable_agent(url: str) -> dict:
    script = [
        {
            "text": "Looking up the order and the policy.",
            "tool_calls": [
                {"tool": "http", "args": {"url": f"{url}/orders/7"}},
                {"tool": "http", "args": {"url": f"{url}/policy"}},
            ],
        },
        {"tool_calls": [{"tool": "http", "args": {"url": f"{url}/slow", "method": "POST"}}]},
        {"text": "Refunded."},
    ]
    return {
        "name": "killable-agent",
        "steps": [
            {
                "id": "helper",
                "kind": "agent",
                "provider": "simulated",
                "prompt": "Refund order 7",
                "tools": ["http"],
                "max_turns": 5,
                "retry": {"max_attempts": 3, "backoff_s": 0.1},
                "simulated": {"latency_ms": 2500, "script": script},
            }
        ],
        "output": "{{ steps.helper.output.text }}",
    }


def child(run, index: int) -> StepRun | None:
    return StepRun.objects.filter(run=run, step_id="helper", map_index=index).first()


def test_workers_killed_mid_turn_and_mid_call_lose_no_turn_and_repeat_no_completed_call(
    owner, agent_cluster, receiver
):
    cluster = agent_cluster
    cluster.start_scheduler()
    llm, tool = cluster.start_pools([("steps.llm", "threads", 4), ("steps.tool", "threads", 4)])
    run = submit(owner.tenant, killable_agent(receiver.url))

    # Turn 2 (child 3) is calling the model: kill -9 the llm worker.
    cluster.wait_until(
        lambda: (turn := child(run, 3)) is not None and turn.status == "running",
        60,
        "turn 2 never started",
    )
    cluster.kill(llm)
    cluster.start_worker("steps.llm", pool="threads", concurrency=4)

    # The call of turn 2 (child 4) is in the receiver's hands: kill -9 the tool worker.
    cluster.wait_until(lambda: receiver.count()["/slow"] == 1, 60, "the slow call never came")
    cluster.kill(tool)
    receiver.release.set()
    cluster.start_worker("steps.tool", pool="threads", concurrency=4)

    run = cluster.wait_run(run, timeout=90)

    assert run.status == "succeeded", run.error
    assert run.output == "Refunded."
    # Each completed call ran once; the call cut by the kill ran again under the same key.
    assert receiver.count() == {"/orders/7": 1, "/policy": 1, "/slow": 2}
    slow_keys = {key for path, key in receiver.requests if path == "/slow"}
    assert slow_keys == {f"{run.public_id}:helper[4]"}
    turn_2, slow = child(run, 3), child(run, 4)
    assert [a.outcome for a in turn_2.attempts.order_by("number")] == ["lost", "succeeded"]
    assert [a.outcome for a in slow.attempts.order_by("number")] == ["lost", "succeeded"]
    assert [a.outcome for a in child(run, 0).attempts.all()] == ["succeeded"]
    assert StepRun.objects.filter(run=run, step_id="helper").count() == 7  # 3 turns, 3 calls
    assert_gapless(run)
    agent_events = Counter(
        Event.objects.filter(run=run, type__startswith="agent.").values_list("type", flat=True)
    )
    assert agent_events == {"agent.turn": 3, "agent.tool_call": 3, "agent.tool_result": 3}


def parallel_echoes(name: str, width: int, delay_ms: int) -> dict:
    return {
        "name": name,
        "steps": [
            {"id": f"s{i}", "kind": "tool", "tool": "echo", "args": {"delay_ms": delay_ms}}
            for i in range(width)
        ],
    }


def echo_agent() -> dict:
    calls = [{"tool": "echo", "args": {"n": n, "delay_ms": 100}} for n in range(3)]
    return {
        "name": "echo-agent",
        "steps": [
            {
                "id": "helper",
                "kind": "agent",
                "provider": "simulated",
                "prompt": "Three lookups, twice.",
                "tools": ["echo"],
                "max_turns": 3,
                "simulated": {
                    "latency_ms": 50,
                    "script": [{"tool_calls": calls}, {"tool_calls": calls}, {"text": "done"}],
                },
            }
        ],
    }


def tool_call_waits_ms(run) -> list[float]:
    calls = StepRun.objects.filter(run=run, step_id="helper", kind="tool")
    return [(s.started_at - s.ready_at).total_seconds() * 1000 for s in calls]


@pytest.mark.flaky(reruns=2)  # waits of real processes over seconds, as in test_fairness.py
def test_another_tenants_flood_does_not_starve_an_agents_tool_calls(owner, cluster):
    cluster.start_scheduler()
    cluster.start_pools([("steps.llm", "threads", 4), ("steps.tool", "threads", 2)])
    idle_run = cluster.wait_run(submit(owner.tenant, echo_agent()), timeout=60)
    assert idle_run.status == "succeeded", idle_run.error
    idle = statistics.median(tool_call_waits_ms(idle_run))

    flooder = make_tenant_client("flooder").tenant
    version = workflow_version_create(tenant=flooder, document=parallel_echoes("flood", 20, 200))
    for _ in range(30):
        run_create(tenant=flooder, version=version, input={})
    time.sleep(2)  # the tool pool fills up with the flood
    run = cluster.wait_run(submit(owner.tenant, echo_agent()), timeout=90)

    assert run.status == "succeeded", run.error
    backlog_left = StepRun.objects.filter(tenant=flooder, status="ready").count()
    assert backlog_left > 300, "the flood drained: the test measured nothing"
    busy = statistics.median(tool_call_waits_ms(run))
    print(f"agent tool-call queue wait: idle median {idle:.0f} ms, under the flood {busy:.0f} ms")
    # The bound of test_fairness.py's interactive tenant under another's backlog.
    assert busy <= idle + 500, f"idle {idle:.0f} ms, busy {busy:.0f} ms"
