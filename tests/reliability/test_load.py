"""Load: many concurrent clients submitting runs and streaming them to their end
(docs/reliability.md, "Load").

Every client, back to back until the time is up: POST /api/v1/runs/ with an Idempotency-Key
(re-sent with the same key when no answer came), then follow the run's SSE stream to its final
event. Nothing the server answers may be a 5xx; every accepted run must finish, be stored once
(however often its key was re-sent) and be streamed to its client to the end.

`make test` runs a short profile; `make load` runs the issue's: 500 clients for 2 minutes
(SWITCHYARD_LOAD_CLIENTS, SWITCHYARD_LOAD_SECONDS).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest

from jobs.models import Run
from jobs.services.workflows import workflow_version_create
from tests.conftest import make_tenant_client
from tests.support.cluster import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.serial]

CLIENTS = int(os.environ.get("SWITCHYARD_LOAD_CLIENTS", "100"))
SECONDS = float(os.environ.get("SWITCHYARD_LOAD_SECONDS", "10"))
FINAL = frozenset({"run.succeeded", "run.failed", "run.cancelled"})

ASSISTANT = {
    "name": "assistant",
    "steps": [
        {
            "id": "plan",
            "kind": "llm",
            "provider": "simulated",
            "prompt": "plan for {{ input.n }}",
            "simulated": {"latency_ms": 30},
        },
        {
            "id": "answer",
            "kind": "llm",
            "provider": "simulated",
            "prompt": "answer {{ steps.plan.output.text }}",
            "simulated": {"latency_ms": 30},
        },
    ],
}


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    no_answer: int = 0
    resent: int = 0
    accepted: dict[str, str] = field(default_factory=dict)  # run id → idempotency key
    streams_complete: int = 0
    streams_broken: list[str] = field(default_factory=list)


async def _submit(http: httpx.AsyncClient, tally: Tally, n: int, stop_at: float) -> str | None:
    """A run id, re-sending with the same key until answered; None when time ran out."""
    key = str(uuid.uuid4())
    while time.monotonic() < stop_at + 30:
        try:
            response = await http.post(
                "/api/v1/runs/",
                json={"workflow": "assistant", "input": {"n": n}},
                headers={"Idempotency-Key": key},
                timeout=90,  # a patient client: the API queues requests rather than refuse them
            )
        except httpx.HTTPError:
            tally.no_answer += 1
            tally.resent += 1
            await asyncio.sleep(0.5)
            continue
        tally.statuses[response.status_code] += 1
        if response.status_code >= 500:
            tally.server_errors.append(f"POST {response.status_code}: {response.text[:200]}")
        if response.status_code in (200, 202):
            run_id = response.json()["id"]
            tally.accepted[run_id] = key
            return run_id
        if response.status_code in (429, 503):
            tally.resent += 1
            await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
            continue
        raise AssertionError(f"unexpected answer {response.status_code}: {response.text[:300]}")
    return None


async def _follow(http: httpx.AsyncClient, tally: Tally, run_id: str) -> None:
    """Read the run's stream to its final event, reconnecting with Last-Event-ID."""
    last_seq = 0
    for _ in range(5):
        headers = {"Accept": "text/event-stream"}
        if last_seq:
            headers["Last-Event-ID"] = str(last_seq)
        try:
            async with http.stream(
                "GET", f"/api/v1/runs/{run_id}/events/", headers=headers, timeout=60
            ) as response:
                tally.statuses[response.status_code] += 1
                if response.status_code >= 500:
                    tally.server_errors.append(f"GET events {response.status_code}")
                    return
                event = ""
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:") and event != "step.delta":
                        seq = json.loads(line[5:])["seq"]
                        if seq != last_seq + 1:
                            tally.streams_broken.append(f"{run_id}: seq {seq} after {last_seq}")
                            return
                        last_seq = seq
                        if event in FINAL:
                            tally.streams_complete += 1
                            return
        except httpx.HTTPError:
            continue
    tally.streams_broken.append(f"{run_id}: never reached its final event (last {last_seq})")


async def _drive(base_url: str, key: str, tally: Tally) -> None:
    stop_at = time.monotonic() + SECONDS
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=CLIENTS + 10)
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {key}"}, limits=limits
    ) as http:

        async def client(index: int) -> None:
            await asyncio.sleep(index * min(5.0, SECONDS / 4) / CLIENTS)  # a ramp
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                run_id = await _submit(http, tally, n, stop_at)
                if run_id is not None:
                    await _follow(http, tally, run_id)

        await asyncio.gather(*(client(i) for i in range(CLIENTS)))


def test_concurrent_clients_submitting_and_streaming_get_no_5xx_and_lose_no_run(
    transactional_db, tmp_path, ledger
):
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    tenant = make_tenant_client("load")
    workflow_version_create(tenant=tenant.tenant, document=ASSISTANT)
    cluster = Cluster(tmp_path, ledger)
    try:
        cluster.start_scheduler()
        cluster.start_worker("steps.llm", pool="threads", concurrency=16)
        base_url = cluster.start_web()
        tally = Tally()
        began = time.monotonic()
        asyncio.run(_drive(base_url, tenant.raw_key, tally))
        elapsed = time.monotonic() - began
    finally:
        cluster.stop_all()

    runs = Run.objects.filter(tenant=tenant.tenant)
    summary = (
        f"{CLIENTS} clients for {SECONDS:g}s ({elapsed:.0f}s with the drain): answers "
        f"{dict(tally.statuses)}, no answer {tally.no_answer}, re-sent {tally.resent}, "
        f"runs accepted {len(tally.accepted)}, stored {runs.count()}, "
        f"streams complete {tally.streams_complete}"
    )
    print(summary)
    assert tally.server_errors == [], summary
    assert len(tally.accepted) > CLIENTS, summary  # every client got at least one run through
    stored = {str(public_id) for public_id in runs.values_list("public_id", flat=True)}
    assert set(tally.accepted) == stored, "a run was lost or created twice: " + summary
    assert not runs.exclude(status="succeeded").exists(), summary
    assert tally.streams_broken == [], summary
    assert tally.streams_complete == len(tally.accepted), summary
