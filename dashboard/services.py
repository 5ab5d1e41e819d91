"""Writes of the dashboard: the operators' audit trail.

The actions themselves are the engine's and the tenants' services (`jobs.transitions.runs`,
`jobs.services.operations`, `tenants.services`); each dashboard action also lands here, so
that a tenant's pause, which has no run log, still says who did it and when.
"""

from __future__ import annotations

from typing import Any

from dashboard.models import OperatorAction


def operator_name(user: Any) -> str:
    """How an operator is named in run events and the audit trail."""
    return f"operator:{user.get_username()}"


def operator_action_record(
    *, user: Any, action: str, target: str, detail: dict[str, Any] | None = None
) -> OperatorAction:
    return OperatorAction.objects.create(
        user=user if getattr(user, "pk", None) else None,
        operator=operator_name(user),
        action=action,
        target=target[:300],
        detail=detail or {},
    )
