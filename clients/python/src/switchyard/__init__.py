"""The Python client of Switchyard's API: `Switchyard` (blocking) and `AsyncSwitchyard`."""

from switchyard._core import Retries
from switchyard.aio import AsyncSwitchyard
from switchyard.client import Switchyard
from switchyard.errors import (
    ApiError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    QuotaFull,
    SwitchyardError,
    Unauthenticated,
    Unavailable,
    WaitTimeout,
)
from switchyard.models import (
    Approval,
    Delta,
    Event,
    Run,
    RunAccepted,
    RunStatus,
    RunSummary,
    Workflow,
    is_final,
)

__all__ = [
    "ApiError",
    "Approval",
    "AsyncSwitchyard",
    "Conflict",
    "ConnectionFailed",
    "Delta",
    "Event",
    "Forbidden",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "QuotaFull",
    "Retries",
    "Run",
    "RunAccepted",
    "RunStatus",
    "RunSummary",
    "Switchyard",
    "SwitchyardError",
    "Unauthenticated",
    "Unavailable",
    "WaitTimeout",
    "Workflow",
    "is_final",
]
