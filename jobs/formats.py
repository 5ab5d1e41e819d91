"""How values are written into and read from the JSON that clients and definitions exchange.

Free of Django, so that the pure engine can use it as well as the API and the services.
"""

import uuid
from datetime import datetime
from typing import Any


def iso(value: datetime | None) -> str | None:
    """A time as ISO 8601 text, or None for no time."""
    return value.isoformat() if value else None


def parse_uuid(value: str | uuid.UUID) -> uuid.UUID | None:
    """The UUID that `value` spells; None for anything that is not one (a 404, not a 500)."""
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def json_type(value: Any) -> str:
    """A JSON value's type as an error message names it: "an object", "an array", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
