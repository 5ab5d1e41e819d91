"""A tenant's allowed origins: the web pages that may follow its runs from a browser.

An origin is what a browser sends in its `Origin` header: `scheme://host[:port]`, lowercase,
without the scheme's default port, without a path. The list is compared with that header
character for character, so it only takes origins in that form: the validator refuses anything
else (a path, a wildcard, a default port, capitals) and says what to write instead. Used by the
CORS answers of the run's stream URLs (`jobs.api.cors`) and the WebSocket origin check
(`orchestrator.asgi`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_problem(origin: Any) -> str | None:
    """Why `origin` is not an origin a browser could send, or None if it is one."""
    if not isinstance(origin, str) or not origin:
        return "an origin is a non-empty string, e.g. https://app.example.com"
    if "*" in origin:
        return f"{origin}: wildcards are not allowed; list each origin"
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return f"{origin}: not an origin (scheme://host[:port])"
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return f"{origin}: an origin is http:// or https:// and a host"
    if parts.username or parts.password:
        return f"{origin}: an origin has no user or password"
    if parts.path or parts.query or parts.fragment or origin.endswith(("?", "#")):
        return f"{origin}: an origin has no path, query or fragment (no trailing slash)"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6
    canonical = f"{parts.scheme}://{host}"
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        canonical += f":{port}"
    if origin != canonical:
        return f"{origin}: browsers send it as {canonical}; write that"
    return None


def validate_allowed_origins(value: Any) -> None:
    """Validator of `Tenant.allowed_origins`: a list of origins, each once."""
    if not isinstance(value, list):
        raise ValidationError('a list of origins, e.g. ["https://app.example.com"]')
    problems = [problem for origin in value if (problem := origin_problem(origin))]
    duplicates = sorted({origin for origin in value if value.count(origin) > 1})
    if duplicates:
        problems.append(f"listed more than once: {', '.join(map(str, duplicates))}")
    if problems:
        raise ValidationError(problems)
