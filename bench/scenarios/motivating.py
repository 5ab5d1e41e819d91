"""Scenario 1: the motivating scenario, both ways.

The same users submit the same agent workflow (3 LLM calls, 2 tool calls, 1 retrieval; 20 s of
simulated latency before scaling) to (a) a synchronous endpoint that runs it inside the request
(gunicorn, a fixed number of threads) behind a gateway that gives up after 30 s, and (b)
Switchyard: submit, then follow the run's SSE stream through the same gateway. All time is
divided by the same factor. Users arrive evenly over the arrival window, each submits once and
waits for its result.

A result is lost when the work finished on the server but no client received it: for (a), a
request the server completed after its client timed out; for (b), a run that succeeded without
its final event reaching a client (the submission timed out, or the stream broke).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen
from bench.stats import percentile, summary
from bench.workload import DOCUMENTS, agent_workflow, install

TICKETS = [
    "I want a refund for my last invoice",
    "My order has not shipped yet, where is it",
    "How do I change the email of my account",
    "The invoice shows the wrong amount, please fix it",
]


def run(bench) -> dict[str, Any]:
    from jobs.services.documents import documents_add

    p = bench.params.motivating
    d = bench.deployment
    agents = bench.tenant("agents")
    install(agents.tenant, agent_workflow(p.scale))
    documents_add(tenant=agents.tenant, documents=DOCUMENTS)
    idle_timeout_s = p.proxy_idle_real_s * p.scale
    heartbeat_s = p.heartbeat_real_s * p.scale

    # Switchyard's processes boot with gunicorn (seconds of CPU each, not measured), then
    # idle while the synchronous deployment is measured: the scheduler polls once a second,
    # the workers wait on the broker, and together they hold a few of the connections
    # gunicorn's 40 threads leave.
    switchyard_ready = bench.spawn_switchyard(
        processes=d.web_processes, SWITCHYARD_SSE_HEARTBEAT_S=f"{heartbeat_s:.3f}"
    )
    # So do the baselines' workers that scenarios 3 and 4 need (idle: see `spawn_ahead`).
    baselines_ready = bench.spawn_ahead()

    # (a) synchronous ---------------------------------------------------------------------
    ledger = bench.workdir / "sync-ledger.txt"
    ledger.unlink(missing_ok=True)
    sync_url = bench.cluster.start_gunicorn(
        workers=d.gunicorn_workers,
        threads=d.gunicorn_threads,
        BENCH_SYNC_LEDGER=str(ledger),
        BENCH_SYNC_WORKFLOW="agent",
    )
    switchyard_url = switchyard_ready()
    baselines_ready()
    try:
        with bench.cpu_meter() as cpu_sync:
            sync_clients = asyncio.run(_drive_sync(sync_url, p))
            # The server goes on with requests whose clients left; wait until it has done
            # them all.
            slots = d.gunicorn_workers * d.gunicorn_threads
            drain_s = p.users / slots * 20 * p.scale * 2 + 20
            _wait_lines(ledger, p.users, drain_s)
    finally:
        bench.cluster.stop_named("gunicorn")
    sync = _sync_metrics(sync_clients, ledger, p)

    # (b) Switchyard ----------------------------------------------------------------------
    url = switchyard_url
    started = time.time()
    with bench.cpu_meter() as cpu_switchyard:
        with bench.profiled("s1-motivating", ("web", "scheduler", "llm", "tool")):
            users = asyncio.run(_drive_switchyard(url, agents.key, p, idle_timeout_s))
        # Runs whose clients stopped following go on: give the server's side a little longer,
        # then those clients come back for their result (GET /api/v1/runs/{id}/): it is
        # stored, so a client that knows its run's id loses nothing by leaving.
        _wait_runs_final(agents.pk, 10)
    collected = asyncio.run(_collect_later(url, agents.key, users, p))
    switchyard = _switchyard_metrics(users, collected, agents.pk, started, p)
    bench.reset_runs()

    return {
        "title": "The motivating scenario: synchronous request-response vs Switchyard",
        "params": {
            "users": p.users,
            "time scale": f"1/{p.time_divisor:g} (every latency and timeout divided by it)",
            "workflow": "retrieval → llm 4 s → tool 2.5 s → llm 7 s → tool 2.5 s → llm 4 s "
            f"(20 s simulated, {20 * p.scale * 1000:.0f} ms scaled)",
            "gateway timeout": f"{p.gateway_timeout_real_s:g} s → "
            f"{p.gateway_timeout_s * 1000:.0f} ms",
            "arrivals": f"{p.users} users evenly over {p.arrival_real_s:g} s → "
            f"{p.arrival_s:.2f} s, one workflow each",
            "synchronous": f"gunicorn gthread {d.gunicorn_workers} workers x "
            f"{d.gunicorn_threads} threads, the workflow inside the request",
            "web processes": d.web_processes,
            "Switchyard": f"daphne x{d.web_processes}, scheduler x1, llm {d.llm_threads} (in "
            f"{d.llm_processes} processes) + tool "
            f"{d.tool_threads} + retrieval {d.retrieval_threads} worker threads; "
            f"submit, then SSE (proxy read timeout {p.proxy_idle_real_s:g} s → "
            f"{idle_timeout_s:.2f} s, heartbeat {p.heartbeat_real_s:g} s → {heartbeat_s:.2f} s)",
        },
        "sync": sync,
        "switchyard": switchyard,
        "cpu": {
            "synchronous": cpu_sync.per(sync["finished_server_side"], "workflow"),
            "Switchyard": cpu_switchyard.per(switchyard["finished_server_side"], "workflow"),
        },
        "chart": _chart(bench.outdir / "s1-motivating.png", sync, switchyard, p),
    }


# --- (a) --------------------------------------------------------------------------------------


async def _drive_sync(url: str, p) -> list[dict[str, Any]]:
    async with loadgen.client(url, connections=p.users) as http:
        origin = time.monotonic()

        async def user(index: int) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, origin + index * p.arrival_s / p.users - time.monotonic()))
            request_id = uuid.uuid4().hex
            body = {"request_id": request_id, "ticket": TICKETS[index % len(TICKETS)]}
            sent = time.time()
            t0 = time.perf_counter()
            outcome = "ok"
            try:
                async with asyncio.timeout(p.gateway_timeout_s):
                    response = await http.post("/workflow", json=body)
                if response.status_code != 200:
                    outcome = f"HTTP {response.status_code}"
            except TimeoutError:
                outcome = "timeout"
            except Exception as exc:  # noqa: BLE001 - any failure is an outcome to count
                outcome = type(exc).__name__
            latency = time.perf_counter() - t0
            return {"id": request_id, "sent": sent, "latency_s": latency, "outcome": outcome}

        return await asyncio.gather(*(user(i) for i in range(p.users)))


def _wait_lines(path: Path, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.2)


def _sync_metrics(clients: list[dict[str, Any]], ledger: Path, p) -> dict[str, Any]:
    finished = {}
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            request_id, at = line.split()
            finished[request_id] = float(at)
    ok = [c for c in clients if c["outcome"] == "ok"]
    timeouts = [c for c in clients if c["outcome"] == "timeout"]
    errors = [c for c in clients if c["outcome"] not in ("ok", "timeout")]
    lost = [c for c in clients if c["outcome"] != "ok" and c["id"] in finished]
    first = min(c["sent"] for c in clients)
    last_ok = max((c["sent"] + c["latency_s"] for c in ok), default=first)
    last_server = max(finished.values(), default=first)
    latencies = [c["latency_s"] * 1000 for c in ok]
    return {
        "requests": len(clients),
        "completed_received": len(ok),
        "timeouts": len(timeouts),
        "timeout_share": round(len(timeouts) / len(clients), 4),
        "errors": len(errors),
        "finished_server_side": len(finished),
        "results_lost": len(lost),
        "completed_per_s": round(len(ok) / max(1e-9, last_ok - first), 1),
        "server_completed_per_s": round(len(finished) / max(1e-9, last_server - first), 1),
        "response_ms": summary(latencies),
        "end_to_end_ms": summary(latencies),
        "all_latencies_ms": sorted(round(c["latency_s"] * 1000, 1) for c in clients),
    }


# --- (b) --------------------------------------------------------------------------------------


async def _drive_switchyard(url: str, key: str, p, idle_timeout_s: float) -> list[dict[str, Any]]:
    async with loadgen.client(url, key=key, connections=2 * p.users + 10) as http:
        origin = time.monotonic()

        async def user(index: int) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, origin + index * p.arrival_s / p.users - time.monotonic()))
            ticket = TICKETS[index % len(TICKETS)]
            sub = await loadgen.submit(
                http, "agent", {"ticket": ticket}, timeout_s=p.gateway_timeout_s
            )
            result: dict[str, Any] = {
                "sent": sub.started,
                "submit_ms": sub.latency_ms,
                "submit_status": sub.status,
                "submit_error": sub.error,
                "run_id": sub.run_id,
            }
            if sub.run_id is None:
                return result
            seen = await loadgen.follow(
                http,
                sub.run_id,
                first_byte_s=p.gateway_timeout_s,
                idle_timeout_s=idle_timeout_s,
                deadline_s=p.follow_deadline_s,
            )
            result.update(final=seen.final, final_at=seen.final_at, stream_error=seen.error)
            return result

        return await asyncio.gather(*(user(i) for i in range(p.users)))


def _wait_runs_final(tenant_id: int, timeout_s: float) -> None:
    from jobs.models import Run
    from jobs.statuses import RUN_FINAL

    deadline = time.monotonic() + timeout_s
    unfinished = Run.objects.filter(tenant_id=tenant_id).exclude(status__in=RUN_FINAL)
    while unfinished.exists() and time.monotonic() < deadline:
        time.sleep(0.25)


async def _collect_later(url: str, key: str, users: list[dict[str, Any]], p) -> set[str]:
    """Ids of runs whose client did not see the end live but fetched the succeeded run after."""
    pending = [u["run_id"] for u in users if u.get("run_id") and u.get("final") != "run.succeeded"]
    found: set[str] = set()
    async with loadgen.client(url, key=key, connections=20) as http:
        slots = asyncio.Semaphore(20)

        async def fetch(run_id: str) -> None:
            async with slots:
                try:
                    response = await http.get(f"/api/v1/runs/{run_id}/", timeout=30)
                except httpx.HTTPError:
                    return
                if response.status_code == 200 and response.json().get("status") == "succeeded":
                    found.add(run_id)

        await asyncio.gather(*(fetch(run_id) for run_id in pending))
    return found


def _switchyard_metrics(
    users: list[dict[str, Any]], collected: set[str], tenant_id: int, started: float, p
):
    from jobs.models import Run

    runs = Run.objects.filter(tenant_id=tenant_id, created_at__gte=_dt(started - 1))
    succeeded = set(runs.filter(status="succeeded").values_list("public_id", flat=True))
    last_finish = max(
        (t.timestamp() for t in runs.values_list("finished_at", flat=True) if t), default=None
    )
    by_status: dict[str, int] = {}
    for status in runs.values_list("status", flat=True):
        by_status[status] = by_status.get(status, 0) + 1
    received = [u for u in users if u.get("final") == "run.succeeded"]
    received_ids = {u["run_id"] for u in received} | collected
    lost = [run_id for run_id in succeeded if str(run_id) not in received_ids]
    submit_timeouts = [u for u in users if u["submit_error"] == "timeout"]
    submit_errors = [u for u in users if u["submit_error"] and u["submit_error"] != "timeout"]
    stream_failures = [u for u in users if u["run_id"] and u.get("stream_error")]
    stream_timeouts = [u for u in stream_failures if "timeout" in u["stream_error"]]
    first = min(u["sent"] for u in users)
    last = max((u["final_at"] for u in received), default=first)
    e2e = [(u["final_at"] - u["sent"]) * 1000 for u in received]
    submit = [u["submit_ms"] for u in users if u["submit_status"] in (200, 202)]
    timeouts = len(submit_timeouts) + len(stream_timeouts)
    return {
        "requests": len(users),
        "accepted": sum(1 for u in users if u["run_id"]),
        "completed_received": len(received),
        "timeouts": timeouts,
        "timeout_share": round(timeouts / len(users), 4),
        "submission_timeouts": len(submit_timeouts),
        "submission_errors": len(submit_errors),
        "submission_error_kinds": sorted({u["submit_error"] for u in submit_errors}),
        "stream_failures": len(stream_failures),
        "stream_error_kinds": sorted({u["stream_error"] for u in stream_failures}),
        "runs_by_status": by_status,
        "finished_server_side": len(succeeded),
        "collected_after_the_stream": len(collected),
        "results_lost": len(lost),
        "completed_per_s": round(len(received) / max(1e-9, last - first), 1),
        "server_completed_per_s": round(
            len(succeeded) / max(1e-9, (last_finish or first) - first), 1
        ),
        "response_ms": summary(submit),
        "end_to_end_ms": summary(e2e),
        "end_to_end_p95_ms": percentile(e2e, 95),
        "all_latencies_ms": sorted(round(x, 1) for x in e2e),
    }


def _dt(unix: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(unix, tz=UTC)


def _chart(path: Path, sync: dict, switchyard: dict, p) -> str:
    from bench.charts import motivating_chart

    return motivating_chart(path, sync, switchyard, gateway_ms=p.gateway_timeout_s * 1000)
