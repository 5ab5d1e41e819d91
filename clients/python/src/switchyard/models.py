"""What the client returns: the models generated from the server's OpenAPI schema
(`switchyard._generated`), under their everyday names, and the one thing the schema does not
describe, a live `Delta` of a step's text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from switchyard._generated.models import (
    ApprovalListOut as ApprovalPage,
)
from switchyard._generated.models import (
    ApprovalOut as Approval,
)
from switchyard._generated.models import (
    EventListOut as EventPage,
)
from switchyard._generated.models import (
    EventOut as Event,
)
from switchyard._generated.models import (
    RunAcceptedOut as RunAccepted,
)
from switchyard._generated.models import (
    RunDetailOut as Run,
)
from switchyard._generated.models import (
    RunListOut as RunPage,
)
from switchyard._generated.models import (
    RunStatusEnum as RunStatus,
)
from switchyard._generated.models import (
    RunSummaryOut as RunSummary,
)
from switchyard._generated.models import (
    WorkflowListOut as WorkflowList,
)
from switchyard._generated.models import (
    WorkflowVersionOut as Workflow,
)

FINAL_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
FINAL_EVENTS = frozenset({"run.succeeded", "run.failed", "run.cancelled"})


def is_final(run: Run | RunSummary | RunAccepted) -> bool:
    return run.status in FINAL_STATUSES


@dataclass(frozen=True)
class Delta:
    """A piece of an LLM step's text as it is written (`step.delta`): live only, never stored,
    so a reconnection does not replay it; the step's output in its final event is the truth.
    `attempt` changes when a retried attempt starts its text anew."""

    run: str
    step: str
    text: str
    map_index: int | None = None
    attempt: int | None = None

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Delta:
        return cls(
            run=payload["run"],
            step=payload["step"],
            text=payload.get("text", ""),
            map_index=payload.get("map_index"),
            attempt=payload.get("attempt"),
        )


__all__ = [
    "FINAL_EVENTS",
    "FINAL_STATUSES",
    "Approval",
    "ApprovalPage",
    "Delta",
    "Event",
    "EventPage",
    "Run",
    "RunAccepted",
    "RunPage",
    "RunStatus",
    "RunSummary",
    "Workflow",
    "WorkflowList",
    "is_final",
]
