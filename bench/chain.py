"""Wall time of a chain of zero-latency simulated LLM steps through the whole engine.

Starts its own scheduler and one llm worker (threads) against the development database with a
private queue prefix, submits `--runs` runs of a `--steps`-step chain one after another, and
prints the median and spread of their wall time (accepted → succeeded) and the per-step
overhead. Usage: .venv/bin/python bench/chain.py [--steps 20] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator.settings")

import django

django.setup()

from jobs.services.runs import run_create  # noqa: E402
from jobs.services.workflows import workflow_version_create  # noqa: E402
from tenants.models import Tenant  # noqa: E402
from tests.support.cluster import Cluster  # noqa: E402


def chain(steps: int) -> dict:
    return {
        "name": f"bench-chain-{steps}",
        "steps": [
            {
                "id": f"s{i}",
                "kind": "llm",
                "provider": "simulated",
                "prompt": f"step {i}",
                "simulated": {"latency_ms": 0},
                **({"after": [f"s{i - 1}"]} if i else {}),
            }
            for i in range(steps)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    tenant, _ = Tenant.objects.get_or_create(slug="bench", defaults={"name": "Bench"})
    version = workflow_version_create(tenant=tenant, document=chain(args.steps))
    with tempfile.TemporaryDirectory() as workdir:
        cluster = Cluster(Path(workdir), Path(workdir), SWITCHYARD_SCHEDULER_POLL_S="1.0")
        try:
            cluster.start_scheduler()
            cluster.start_worker("steps.llm", pool="threads", concurrency=8)
            walls = []
            for _ in range(args.runs + 1):
                run = run_create(tenant=tenant, version=version, input={})
                run = cluster.wait_run(run, timeout=120)
                assert run.status == "succeeded", run.error
                walls.append((run.finished_at - run.created_at).total_seconds())
            walls = walls[1:]  # the first run warms connections and caches
        finally:
            cluster.stop_all()
    median = statistics.median(walls)
    print(f"{args.steps}-step chain, zero-latency simulated llm steps, {args.runs} runs:")
    print(
        f"  wall time median {median * 1000:.0f} ms (min {min(walls) * 1000:.0f}, "
        f"max {max(walls) * 1000:.0f}); {median / args.steps * 1000:.1f} ms per step"
    )


if __name__ == "__main__":
    main()
