"""Request body parsing: JSON that PostgreSQL can store.

Python's `json` accepts strings that PostgreSQL cannot hold: NUL characters (`\\u0000`, refused
by `text` and `jsonb`) and unpaired UTF-16 surrogates (`\\ud800`, not encodable as UTF-8).
Left alone they pass validation and fail at the INSERT, as a 500. They are refused here, at
parse time, with a 400 that names where they are. (Schemathesis found this.)

So are documents nested deeper than `MAX_NESTING`: Python's json, the validators and the
templates recurse, and a body of a few thousand `[` raised RecursionError, a 500 (found by
tests/security/test_fuzz_definitions.py).
"""

from __future__ import annotations

import math
import re
from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from jobs.definitions import MAX_NESTING, nesting_fault

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable_path(value: Any, path: str = "$") -> str | None:
    """The path of the first value PostgreSQL could not store as JSON, or None.

    Besides the characters above, this refuses what is not JSON at all (a YAML date, NaN,
    infinity), so that a document parsed from YAML is held to the same rule.
    """
    if isinstance(value, str):
        return path if _UNSTORABLE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or _UNSTORABLE.search(key):
                return f"{path}.{key!r}"
            found = unstorable_path(item, f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = unstorable_path(item, f"{path}[{index}]")
            if found:
                return found
        return None
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    return path


def check_storable(value: Any) -> None:
    """Raise ParseError (400 `malformed_request`) if `value` cannot be stored as JSON."""
    too_deep = nesting_fault(value)
    if too_deep is not None:
        raise ParseError(f"the body is nested more than {MAX_NESTING} levels deep")
    path = unstorable_path(value)
    if path:
        raise ParseError(
            f"the body holds a value that cannot be stored (at {path}): strings may not "
            "contain NUL characters or unpaired surrogates, and numbers must be finite"
        )


class StrictJSONParser(JSONParser):
    """DRF's JSON parser, refusing what PostgreSQL cannot store (see the module docstring)."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"the body is nested more than {MAX_NESTING} levels deep") from None
        check_storable(data)
        return data
