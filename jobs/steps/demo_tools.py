"""Tools of the demo's support agent (`jobs.demo.SUPPORT_AGENT`): a shop's order lookup and
refund, deterministic and without side effects, so that the seeded agent can run anywhere.
Registered with the built-in tools."""

from __future__ import annotations

import hashlib
from typing import Any

from jobs.steps.registry import StepContext, register_tool

ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["order"],
    "additionalProperties": False,
    "properties": {"order": {"type": "string", "pattern": "^[A-Z]-[0-9]{4}$"}},
}

REFUND_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["order", "amount", "reason"],
    "additionalProperties": False,
    "properties": {
        "order": {"type": "string", "pattern": "^[A-Z]-[0-9]{4}$"},
        "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
        "reason": {"type": "string", "minLength": 3, "maxLength": 500},
    },
}


@register_tool(
    "demo.order_lookup", description="Look up a shop order by its number.", schema=ORDER_SCHEMA
)
def order_lookup(ctx: StepContext, order: str) -> dict[str, Any]:
    """The same order for the same number: its status, total and items."""
    digest = hashlib.sha256(order.encode()).digest()
    return {
        "order": order,
        "status": ("delivered", "shipped", "delivered damaged")[digest[0] % 3],
        "total_eur": round(20 + digest[1] * 0.5, 2),
        "items": ["Desk lamp", "USB-C cable", "Notebook"][: 1 + digest[2] % 3],
    }


@register_tool(
    "demo.refund",
    description="Refund an amount of a shop order to the original payment method.",
    schema=REFUND_SCHEMA,
)
def refund(ctx: StepContext, order: str, amount: float, reason: str) -> dict[str, Any]:
    """A refund receipt (nothing is paid: this is the demo's shop)."""
    return {
        "order": order,
        "refunded_eur": amount,
        "reason": reason,
        "reference": ctx.idempotency_key,
    }
