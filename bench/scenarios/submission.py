"""Scenario 2: submission latency, 200 concurrent clients submitting back to back.

The web alone (the deployment's `web_processes` daphne processes behind one socket; no
scheduler, no workers: the API never waits on them, DESIGN §3.7, and on two cores they would
only compete for the CPU), so the figures are the API's own.
The submitted workflow is the motivating scenario's (6 steps). One client submitting alone
first gives the service time that concurrency then multiplies.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from bench import loadgen
from bench.charts import submission_chart
from bench.harness import cpu_seconds
from bench.stats import summary
from bench.workload import agent_workflow, install


def run(bench) -> dict[str, Any]:
    p = bench.params.submission
    d = bench.deployment
    bench.stop_switchyard()
    url = bench.start_web(fresh=True, processes=d.web_processes)
    submitters = bench.tenant("submitters")
    install(submitters.tenant, agent_workflow(bench.params.motivating.scale))

    web_pids = bench.web_pids()
    single = asyncio.run(_single(url, submitters.key, p.single_client_requests))
    cpu_before = sum(cpu_seconds(pid) for pid in web_pids)
    with bench.profiled("s2-submission", ("web",)):
        results, wall = asyncio.run(_concurrent(url, submitters.key, p.clients, p.duration_s))
    web_cpu_s = sum(cpu_seconds(pid) for pid in web_pids) - cpu_before
    bench.reset_runs()

    ok = [r.latency_ms for r in results if r.run_id]
    errors = Counter(r.error for r in results if not r.run_id)
    return {
        "title": "Submission latency",
        "params": {
            "clients": f"{p.clients} concurrent, each submitting back to back",
            "duration": f"{p.duration_s:g} s",
            "workflow": "the agent workflow (6 steps)",
            "web processes": d.web_processes,
            "processes": f"daphne x{d.web_processes} behind one socket (scheduler and workers "
            "stopped)",
            "baseline": f"1 client, {p.single_client_requests} requests one after another",
        },
        "requests": len(results),
        "latency_ms": summary(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "requests_per_s": round(len(results) / wall, 1),
        "accepted_per_s": round(len(ok) / wall, 1),
        "single_client_ms": summary([r.latency_ms for r in single if r.run_id]),
        # Little's law: with clients submitting back to back, latency = clients / throughput.
        "littles_law_mean_ms": round(p.clients / max(1e-9, len(results) / wall) * 1000, 1),
        "web_cpu_ms_per_request": round(web_cpu_s * 1000 / max(1, len(results)), 2),
        "chart": submission_chart(
            bench.outdir / "s2-submission.png", ok, [r.latency_ms for r in single if r.run_id]
        ),
    }


async def _single(url: str, key: str, count: int) -> list[loadgen.Submitted]:
    async with loadgen.client(url, key=key, connections=1) as http:
        await loadgen.submit(http, "agent", {"ticket": "warm-up"})
        return [await loadgen.submit(http, "agent", {"ticket": f"t{i}"}) for i in range(count)]


async def _concurrent(url: str, key: str, clients: int, duration_s: float):
    async with loadgen.client(url, key=key, connections=clients) as http:
        counter = iter(range(10**9))

        async def action() -> loadgen.Submitted:
            return await loadgen.submit(http, "agent", {"ticket": f"t{next(counter)}"})

        started = time.monotonic()
        results = await loadgen.closed_loop(clients, duration_s, action)
        return results, time.monotonic() - started
