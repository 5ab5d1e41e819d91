"""Scenario 6: 1,000 concurrent live clients on one web process, each following a run: first
over SSE, then (new runs, new clients) over WebSockets.

In each phase the runs are created while their tenant is paused; every client connects and
gets its first byte; then the tenant is resumed and the runs execute. A stored event's delivery
latency is the client's receive time minus the event's `at` (its row's creation inside the
committing transaction, so commit → client within a millisecond), over the events committed
after the release (the replayed ones are history, not delivery), until `deadline_s` after the
release; reported over the whole phase
and by fifth of the phase (events in order of commit: early against late). Every client's seqs
are checked: each event once, in order, none missing. The web process's resident memory is
sampled throughout. Each phase has a web process of its own, fresh, and is released once
every client has begun to receive its run's log (a socket is open before it is authenticated,
a stream before its log is read).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Any

from bench import loadgen
from bench.charts import streams_chart
from bench.harness import cpu_seconds, rss_mb
from bench.seed import backlog
from bench.stats import summary
from bench.workload import chain_workflow, install

TRANSPORTS = ("sse", "websocket")
# WebSocket handshakes in progress at once: the load generator ramps up rather than asking
# daphne for a thousand at once (each must be accepted within its handshake timeout, 5 s).
HANDSHAKES_AT_ONCE = 100


def run(bench) -> dict[str, Any]:
    p = bench.params.streams
    followed = bench.tenant("streams")
    version = install(
        followed.tenant, chain_workflow(p.steps_per_run, p.step_latency_ms, name="streamed")
    )
    phases = {}
    for transport in TRANSPORTS:
        # One web process, as the target says ("on one web process"), fresh for each phase:
        # its memory and CPU are the cost of these streams, not divided between processes.
        url = bench.start_switchyard(fresh=True, processes=1)
        (web_pid,) = bench.web_pids()
        phases[transport] = _phase(bench, url, web_pid, followed, version, transport)
    sse = phases["sse"]
    return {
        "title": f"{p.clients} concurrent SSE clients, then {p.clients} WebSocket clients, "
        "on one web process",
        "params": {
            "clients": f"{p.clients} per transport, one per run, all connected before the "
            "runs start",
            "runs": f"{p.steps_per_run} chained simulated llm steps of {p.step_latency_ms:g} ms "
            "each (with token deltas)",
            "web processes": 1,
            "web": "daphne x1 (default SSE heartbeat 15 s)",
            "latency": "client receive time - event `at`, for events committed after release",
        },
        # The SSE phase's figures at the top level, as before; the WebSocket phase beside them.
        **{key: value for key, value in sse.items() if key != "chart_data"},
        "websocket": {k: v for k, v in phases["websocket"].items() if k != "chart_data"},
        "chart": streams_chart(
            bench.outdir / "s6-streams.png",
            sse["chart_data"]["latencies"],
            sse["chart_data"]["rss"],
            websocket=phases["websocket"]["chart_data"]["latencies"],
        ),
    }


def _phase(bench, url, web_pid, followed, version, transport: str) -> dict[str, Any]:
    from jobs.models import Run, StepRun
    from tenants.services import tenant_pause, tenant_resume

    p = bench.params.streams
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
        with (
            bench.profiled(f"s6-streams-{transport}", ("web", "llm")),
            bench.cpu_meter() as meter,
        ):
            seen, connect_s = asyncio.run(
                _follow_all(url, followed.key, run_ids, release, p, transport)
            )
    finally:
        stop.set()
        sampler.join()
    cpu_used = cpu_seconds(web_pid) - cpu_before
    steps_done = StepRun.objects.filter(run__tenant_id=followed.pk, status="succeeded").count()
    bench.reset_runs()

    released = marks.get("released", float("inf"))
    delivered = sorted(
        (at, (received - at) * 1000)
        for client in seen
        for _seq, _type, at, received in client.events
        if at >= released
    )
    latencies = [latency for _, latency in delivered]
    finals = sum(1 for client in seen if client.final == "run.succeeded")
    errors = [client.error for client in seen if client.error]
    peak = max((m for _, m in samples), default=0.0)
    return {
        "clients_connected_s": round(connect_s, 2),
        "delivery_ms": summary(latencies),
        "delivery_ms_by_fifth": _by_fifth(delivered),
        "events_delivered": len(latencies),
        "events_out_of_order_or_repeated": sum(_disorder(client) for client in seen),
        "events_missing": sum(_missing(client) for client in seen),
        "deltas_delivered": sum(client.deltas for client in seen),
        "clients_finished": finals,
        "client_errors": len(errors),
        "client_error_kinds": sorted(set(errors)),
        "web_rss_mb": {
            "before": round(rss_before, 1),
            "connected": round(marks.get("rss_connected", 0.0), 1),
            "peak": round(peak, 1),
            "per_client_kib": round((peak - rss_before) * 1024 / p.clients, 1),
            "per_client_connected_kib": round(
                (marks.get("rss_connected", rss_before) - rss_before) * 1024 / p.clients, 1
            ),
        },
        "web_cpu_s": round(cpu_used, 1),
        "cpu": {f"streamed runs ({transport})": meter.per(steps_done)},
        "chart_data": {"latencies": latencies, "rss": samples},
    }


def _by_fifth(delivered: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """P50 / P99 of the events in each fifth of the phase, by commit time (early → late)."""
    fifths = []
    count = len(delivered)
    if not count:
        return fifths
    first_at = delivered[0][0]
    for index in range(5):
        part = delivered[index * count // 5 : (index + 1) * count // 5]
        if not part:
            continue
        stats = summary([latency for _, latency in part])
        fifths.append(
            {
                "committed_s": [round(part[0][0] - first_at, 1), round(part[-1][0] - first_at, 1)],
                "p50": stats["p50"],
                "p99": stats["p99"],
            }
        )
    return fifths


def _disorder(client: loadgen.Followed) -> int:
    """Stored events that came after one with the same or a later seq."""
    seqs = [seq for seq, *_ in client.events]
    return sum(1 for before, after in itertools.pairwise(seqs) if after <= before)


def _missing(client: loadgen.Followed) -> int:
    """Seqs missing between the first and the last event the client received."""
    seqs = [seq for seq, *_ in client.events]
    return (max(seqs) - min(seqs) + 1 - len(set(seqs))) if seqs else 0


async def _follow_all(url, key, run_ids, release, p, transport: str):
    async with loadgen.client(url, key=key, connections=len(run_ids) + 10) as http:
        # A client is ready once its run's log has begun to arrive: the web process has
        # authenticated it and subscribed to the run (it subscribes before it replays).
        seen = [loadgen.Followed(replayed=asyncio.Event()) for _ in run_ids]
        opening = asyncio.Semaphore(HANDSHAKES_AT_ONCE)
        started = time.monotonic()
        # Each client's own bound covers connecting too; the phase's deadline counts from the
        # release (below).
        bounds = {"first_byte_s": 60, "idle_timeout_s": 60, "deadline_s": 120 + p.deadline_s}
        followers = [
            asyncio.create_task(
                loadgen.follow(http, run_id, seen=record, **bounds)
                if transport == "sse"
                else loadgen.follow_ws(url, key, run_id, seen=record, opening=opening, **bounds)
            )
            for run_id, record in zip(run_ids, seen, strict=True)
        ]
        async with asyncio.timeout(120):
            await asyncio.gather(*(record.replayed.wait() for record in seen))
        connect_s = time.monotonic() - started
        await asyncio.to_thread(release)
        _, late = await asyncio.wait(followers, timeout=p.deadline_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        for record in seen:
            if record.final is None and not record.error:
                record.error = "deadline"
        return seen, connect_s
