"""The webhook verification snippet exactly as documented, for tests to verify with."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_SNIPPET = re.compile(r"<!-- webhook-verification-snippet -->\s*```python\n(.*?)```", re.DOTALL)


def documented_snippet(path: Path = ROOT / "docs" / "api.md") -> str:
    match = _SNIPPET.search(path.read_text())
    assert match, f"{path} has no webhook verification snippet"
    return match.group(1)


def documented_verifier(path: Path = ROOT / "docs" / "api.md") -> Callable[..., bool]:
    """`verify_switchyard_signature(secret, headers, body)` from the documented snippet."""
    namespace: dict = {}
    exec(documented_snippet(path), namespace)  # our own documentation, run as published
    return namespace["verify_switchyard_signature"]
