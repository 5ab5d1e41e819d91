"""The statuses of runs, steps and attempts: their one definition.

Plain string enums, free of Django, so that the pure engine (`jobs/engine.py`) and the models
(`jobs/models.py`, whose `TextChoices` are built from these) speak the same words. A member
equals its value (`StepStatus.READY == "ready"`), so statuses read back from the database
compare equal to them.
"""

from enum import StrEnum


class RunStatus(StrEnum):
    ACCEPTED = "accepted"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    PENDING = "pending"
    READY = "ready"
    QUEUED = "queued"
    RUNNING = "running"
    RETRY_WAIT = "retry_wait"
    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


class AttemptOutcome(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"  # the worker died or its lease expired before it reported
    REFUSED = "refused"  # it reported after its lease was taken over (fencing)


RUN_FINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})

# A step is active while the scheduler or a worker holds it; the engine moves only pending
# steps and leaves active ones alone (unless it cancels them).
STEP_ACTIVE = frozenset(
    {
        StepStatus.READY,
        StepStatus.QUEUED,
        StepStatus.RUNNING,
        StepStatus.RETRY_WAIT,
        StepStatus.WAITING,
    }
)
STEP_FINAL = frozenset(
    {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.CANCELLED}
)
