"""Many map runs at the default quota all finish, on real processes.

A map's own row is `running` from the moment its items exist until the last of them ends, but
no worker runs it: its items run. Counted against the tenant's `max_concurrent_steps`, enough
waiting map rows fill the quota that their own items need, and nothing ever runs again. Here
one tenant at the default quotas has 80 runs of `chain_and_map` accepted at once (more map
rows than its quota), for a scheduler and worker pools shaped as `make run` starts them, with
direct admission on (the production default).
"""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, transaction
from django.db.models import Count, Q

from jobs.models import Run, StepRun
from jobs.services.workflows import workflow_version_create
from jobs.statuses import RUN_FINAL
from jobs.transitions.runs import run_create
from tenants.models import Tenant
from tests.support.cluster import Cluster
from tests.support.workflows import assert_gapless, chain_and_map

pytestmark = [pytest.mark.cluster, pytest.mark.serial]

RUNS = 80
# As `make run`: two LLM worker processes of 32 threads (LLM_PROCESSES, LLM_CONCURRENCY),
# a prefork tool pool of 4 (TOOL_CONCURRENCY): 68 slots, more than the quota of 50.
LLM_WORKERS, LLM_THREADS, TOOL_PROCESSES = 2, 32, 4
POOL_CAPACITY = {
    "steps.llm": LLM_WORKERS * LLM_THREADS,
    "steps.tool": TOOL_PROCESSES,
    "steps.retrieval": 2,
    "steps.control": 2,
}
FINISH_WITHIN_S = 240


@pytest.fixture
def deployment(transactional_db, tmp_path, ledger):
    harness = Cluster(
        tmp_path,
        ledger,
        SWITCHYARD_DIRECT_ADMISSION="true",
        SWITCHYARD_POOL_CAPACITY=",".join(f"{q}={n}" for q, n in POOL_CAPACITY.items()),
    )
    try:
        yield harness
    finally:
        harness.stop_all()


class OccupancySampler(threading.Thread):
    """Samples, every 50 ms until stopped, a tenant's steps occupying a worker (queued or
    running, not a map's own row) and its map rows waiting for their items; keeps the peaks."""

    def __init__(self, tenant: Tenant):
        super().__init__(daemon=True)
        self.tenant = tenant
        self.stopping = threading.Event()
        self.samples = self.peak_on_workers = self.peak_waiting_maps = 0

    def run(self) -> None:
        try:
            while not self.stopping.wait(0.05):
                counts = StepRun.objects.filter(
                    tenant=self.tenant, status__in=("queued", "running")
                ).aggregate(
                    on_workers=Count("id", filter=~Q(kind="map")),
                    waiting_maps=Count("id", filter=Q(kind="map", map_index__isnull=True)),
                )
                self.samples += 1
                self.peak_on_workers = max(self.peak_on_workers, counts["on_workers"])
                self.peak_waiting_maps = max(self.peak_waiting_maps, counts["waiting_maps"])
        finally:
            connection.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


def test_eighty_map_runs_at_the_default_quota_all_succeed_within_the_quota(
    owner, deployment, settings
):
    tenant = owner.tenant
    assert tenant.max_concurrent_steps == 50  # the default
    # This process submits as the web does: its transactions admit directly and publish to
    # the cluster's queues.
    settings.SWITCHYARD_DIRECT_ADMISSION = True
    settings.SWITCHYARD_QUEUE_PREFIX = deployment.prefix
    settings.SWITCHYARD_POOL_CAPACITY = POOL_CAPACITY
    version = workflow_version_create(tenant=tenant, document=chain_and_map())
    deployment.start_scheduler()
    deployment.start_pools(
        [("steps.llm", "threads", LLM_THREADS)] * LLM_WORKERS
        + [("steps.tool", "prefork", TOOL_PROCESSES)]
    )
    sampler = OccupancySampler(tenant)
    sampler.start()

    started = time.monotonic()
    try:
        # Accepted together: one commit makes all their map rows `running` at once.
        with transaction.atomic():
            run_ids = [
                run_create(
                    tenant=tenant, version=version, input={"items": [n, n + 1, n + 2]}
                ).public_id
                for n in range(RUNS)
            ]
        submitted_s = time.monotonic() - started
        runs = Run.objects.filter(public_id__in=run_ids)
        deadline = started + FINISH_WITHIN_S
        while runs.exclude(status__in=RUN_FINAL).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        finished_s = time.monotonic() - started
    finally:
        sampler.stop()

    statuses = dict(runs.values("status").annotate(n=Count("id")).values_list("status", "n"))
    print(
        f"\n{RUNS} runs submitted in {submitted_s:.1f}s, final after {finished_s:.1f}s: "
        f"{statuses}; {sampler.samples} samples: peak steps on workers "
        f"{sampler.peak_on_workers}, peak map rows waiting {sampler.peak_waiting_maps}"
    )
    open_steps = dict(
        StepRun.objects.filter(tenant=tenant)
        .exclude(status__in=("succeeded", "skipped"))
        .values("status")
        .annotate(n=Count("id"))
        .values_list("status", "n")
    )
    assert statuses == {"succeeded": RUNS}, f"after {finished_s:.0f}s; steps: {open_steps}"
    # More map rows waited at once than the quota lets steps run: counted against it, they
    # alone would have filled it.
    assert sampler.peak_waiting_maps > tenant.max_concurrent_steps
    assert 0 < sampler.peak_on_workers <= tenant.max_concurrent_steps
    for run in runs:
        assert run.output == 3
        assert_gapless(run)
