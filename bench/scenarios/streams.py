"""Scenario 6: 1,000 concurrent SSE clients on one web process, each following a run.

The runs are created while their tenant is paused; every client connects and gets its first
byte; then the tenant is resumed and the runs execute. A stored event's delivery latency is the
client's receive time minus the event's `at` (its row's creation inside the committing
transaction, so commit → client within a millisecond), over the events committed after the
release (the replayed ones are history, not delivery). The web process's resident memory is
sampled throughout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from bench import loadgen
from bench.charts import streams_chart
from bench.harness import cpu_seconds, rss_mb
from bench.seed import backlog
from bench.stats import summary
from bench.workload import chain_workflow, install


def run(bench) -> dict[str, Any]:
    from jobs.models import Run, StepRun
    from tenants.services import tenant_pause, tenant_resume

    p = bench.params.streams
    # One web process, as the target says ("on one web process"): its memory and CPU are the
    # cost of these streams, not divided between processes.
    url = bench.start_switchyard(fresh=True, processes=1)
    (web_pid,) = bench.web_pids()
    followed = bench.tenant("streams")
    version = install(
        followed.tenant, chain_workflow(p.steps_per_run, p.step_latency_ms, name="streamed")
    )
    tenant_pause(tenant=followed.tenant)
    run_ids = [
        str(public_id)
        for public_id in Run.objects.filter(
            pk__in=backlog(followed.tenant, version, p.clients)
        ).values_list("public_id", flat=True)
    ]

    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    origin = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - origin, rss_mb(web_pid)))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    rss_before = rss_mb(web_pid)
    cpu_before = cpu_seconds(web_pid)
    sampler.start()
    marks: dict[str, float] = {}

    def release() -> None:  # runs on a thread of its own: its connection is closed after
        from django.db import connection

        marks["released"] = time.time()
        marks["rss_connected"] = rss_mb(web_pid)
        try:
            tenant_resume(tenant=followed.tenant)
            bench.wake_scheduler()
        finally:
            connection.close()

    try:
        with bench.profiled("s6-streams", ("web",)), bench.cpu_meter() as meter:
            seen, connect_s = asyncio.run(_follow_all(url, followed.key, run_ids, release, p))
    finally:
        stop.set()
        sampler.join()
    cpu_used = cpu_seconds(web_pid) - cpu_before
    steps_done = StepRun.objects.filter(run__tenant_id=followed.pk, status="succeeded").count()
    bench.reset_runs()

    released = marks.get("released", float("inf"))
    latencies = [
        (received - at) * 1000
        for client in seen
        for _seq, _type, at, received in client.events
        if at >= released
    ]
    finals = sum(1 for client in seen if client.final == "run.succeeded")
    errors = [client.error for client in seen if client.error]
    peak = max((m for _, m in samples), default=0.0)
    return {
        "title": f"{p.clients} concurrent SSE clients on one web process",
        "params": {
            "clients": f"{p.clients}, one per run, all connected before the runs start",
            "runs": f"{p.steps_per_run} chained simulated llm steps of {p.step_latency_ms:g} ms "
            "each (with token deltas)",
            "web processes": 1,
            "web": "daphne x1 (default SSE heartbeat 15 s)",
            "latency": "client receive time - event `at`, for events committed after release",
        },
        "clients_connected_s": round(connect_s, 2),
        "delivery_ms": summary(latencies),
        "events_delivered": len(latencies),
        "deltas_delivered": sum(client.deltas for client in seen),
        "clients_finished": finals,
        "client_errors": len(errors),
        "client_error_kinds": sorted(set(errors)),
        "web_rss_mb": {
            "before": round(rss_before, 1),
            "connected": round(marks.get("rss_connected", 0.0), 1),
            "peak": round(peak, 1),
            "per_client_kib": round((peak - rss_before) * 1024 / p.clients, 1),
        },
        "web_cpu_s": round(cpu_used, 1),
        "cpu": {"streamed runs": meter.per(steps_done)},
        "chart": streams_chart(bench.outdir / "s6-streams.png", latencies, samples),
    }


async def _follow_all(url, key, run_ids, release, p):
    async with loadgen.client(url, key=key, connections=len(run_ids) + 10) as http:
        connected = [asyncio.Event() for _ in run_ids]
        started = time.monotonic()
        followers = [
            asyncio.create_task(
                loadgen.follow(
                    http,
                    run_id,
                    first_byte_s=60,
                    idle_timeout_s=60,
                    deadline_s=p.deadline_s,
                    connected=event,
                )
            )
            for run_id, event in zip(run_ids, connected, strict=True)
        ]
        async with asyncio.timeout(120):
            await asyncio.gather(*(event.wait() for event in connected))
        connect_s = time.monotonic() - started
        await asyncio.to_thread(release)
        return await asyncio.gather(*followers), connect_s
