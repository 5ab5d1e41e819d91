"""A worker whose database connection breaks while a handler runs still reports the result.

A PostgreSQL restart drops every connection; a worker's handler may be minutes into an LLM
call when it happens. The report must reconnect, not fail and leave the finished attempt to
expire with its lease and run again (found by the chaos suite: a long step ran twice after a
PostgreSQL restart). Here the connections are dropped by terminating the backends of this
test session's own database, which is what a restart does to them; the shared PostgreSQL
itself is not touched.
"""

from __future__ import annotations

import pytest
from django.db import connection

from jobs.models import StepRun
from tests.support import tools
from tests.support.workflows import submit, tool_step

pytestmark = pytest.mark.cluster


def _drop_other_connections() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def test_a_result_is_reported_after_the_workers_connection_dropped_mid_step(owner, cluster, ledger):
    cluster.start_scheduler()
    worker = cluster.start_worker("steps.tool", pool="threads", concurrency=2)
    run = submit(
        owner.tenant,
        {
            "name": "dropped",
            "steps": [
                tool_step(
                    "slow",
                    "test.block_first",
                    args={"key": "slow", "block_s": 3},
                    timeout_s=30,
                    retry={"max_attempts": 3, "backoff_s": 0.1},
                )
            ],
        },
    )
    cluster.wait_until((ledger / "slow.pid").exists, 30, "the step never started")
    assert _drop_other_connections() >= 1  # the worker's, held since its claim

    run = cluster.wait_run(run, timeout=25)  # well before the 31 s lease could expire

    assert run.status == "succeeded", run.error
    step = StepRun.objects.get(run=run)
    assert step.attempt == 1
    assert step.output["call"] == 1 and step.output["late"] is True
    assert len(tools.calls("slow")) == 1
    assert worker.alive()
