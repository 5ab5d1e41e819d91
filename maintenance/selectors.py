"""What operators see of the housekeeping: each job's last run, from its stored task result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django_celery_results.models import TaskResult

from maintenance.timers import JOB_NAMES


@dataclass(frozen=True)
class LastRun:
    job: str  # the task's name
    status: str  # SUCCESS, FAILURE, ... (Celery's), or "never" before its first run
    at: datetime | None = None
    rows: int = 0
    duration_s: float | None = None
    errors: list[str] = field(default_factory=list)
    finished: bool = True
    task_result_id: int | None = None

    @property
    def label(self) -> str:
        return self.job.removeprefix("maintenance.").replace("_", " ")

    @property
    def ok(self) -> bool:
        return self.status == "SUCCESS" and not self.errors


def housekeeping_last_runs() -> list[LastRun]:
    """The last stored run of each housekeeping job, in a fixed order."""
    runs = []
    for job in JOB_NAMES:
        result = TaskResult.objects.filter(task_name=job).order_by("-date_done", "-id").first()
        runs.append(LastRun(job=job, status="never") if result is None else _last_run(result))
    return runs


def _last_run(result: TaskResult) -> LastRun:
    try:
        value: Any = json.loads(result.result) if result.result else None
    except ValueError:
        value = None
    if result.status == "SUCCESS" and isinstance(value, dict):
        return LastRun(
            job=result.task_name,
            status=result.status,
            at=result.date_done,
            rows=int(value.get("rows", 0)),
            duration_s=value.get("duration_s"),
            errors=[str(error) for error in value.get("errors", [])],
            finished=bool(value.get("finished", True)),
            task_result_id=result.pk,
        )
    message = value.get("exc_message") if isinstance(value, dict) else value
    return LastRun(
        job=result.task_name,
        status=result.status,
        at=result.date_done,
        errors=[f"{result.status}: {message}"] if result.status != "SUCCESS" else [],
        task_result_id=result.pk,
    )
