"""The short chaos profile, inside `make test`: faults under load, then every invariant.

The profile runs as its own process (`python -m tests.reliability.chaos --profile short`):
it starts private PostgreSQL, RabbitMQ and Redis instances to break, and its Django must talk
to that PostgreSQL, not to this session's test database. `make chaos` runs the full profile.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.chaos import format_report

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.cluster, pytest.mark.serial]


def _can_start_private_services() -> bool:
    return (
        os.geteuid() == 0
        and shutil.which("rabbitmq-server") is not None
        and shutil.which("redis-server") is not None
        and bool(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    )


@pytest.mark.skipif(
    not _can_start_private_services(),
    reason="needs root, rabbitmq-server, redis-server and PostgreSQL's initdb",
)
def test_the_short_chaos_profile_loses_no_run_and_commits_no_step_twice(tmp_path):
    report_path = tmp_path / "chaos-short.json"
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.reliability.chaos",
            "--profile",
            "short",
            "--report",
            str(report_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert report_path.exists(), finished.stdout[-5000:] + finished.stderr[-5000:]
    report = json.loads(report_path.read_text())
    summary = format_report(report)
    # Keep the latest report beside the full profile's.
    results = ROOT / "reliability" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "chaos-short.txt").write_text(summary + "\n")

    assert report["runs_accepted"] > 20, summary
    assert report["runs_lost"] == 0, summary
    assert report["duplicate_committed_executions"] == 0, summary
    assert report["runs_completed"] == report["runs_in_database"], summary
    assert all(row["recovered"] == row["injected"] for row in report["recovery"].values()), summary
    assert report["violations"] == {}, summary
    assert finished.returncode == 0, summary
