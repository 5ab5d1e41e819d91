"""Every route the product serves, read from its routing tables rather than listed by hand.

HTTP routes come from `django.urls.get_resolver()` (walked recursively through every
`include`), WebSocket routes from `orchestrator.asgi.websocket_urlpatterns`. A route is known
by its pattern as written (`api/v1/runs/<str:run_id>/cancel/`), which is what a new endpoint
adds, named or not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from django.urls import URLPattern, URLResolver, get_resolver

_PARAMETER = re.compile(r"<(?:(?P<converter>[^>:]+):)?(?P<name>[^>]+)>")


@dataclass(frozen=True)
class Route:
    pattern: str  # "api/v1/runs/<str:run_id>/"
    name: str  # "api:run-detail" ("" when unnamed)
    callback: Callable[..., Any]

    @property
    def parameters(self) -> list[str]:
        return [match["name"] for match in _PARAMETER.finditer(self.pattern)]

    @property
    def is_admin(self) -> bool:
        return self.pattern.startswith("admin/")

    def path(self, values: dict[str, str]) -> str:
        """The URL path with each `<converter:name>` replaced by `values[name]`."""
        return "/" + _PARAMETER.sub(lambda match: values[match["name"]], self.pattern)

    def implemented_methods(self) -> set[str] | None:
        """The HTTP methods a class-based view implements, or None for a function view
        (whose methods the expectation table states)."""
        view_class = getattr(self.callback, "cls", None) or getattr(
            self.callback, "view_class", None
        )
        if view_class is None:
            return None
        return {
            method.upper()
            for method in view_class.http_method_names
            if method not in ("options", "head") and hasattr(view_class, method)
        }


def _walk(patterns: list, prefix: str, namespace: str) -> Iterator[Route]:
    for entry in patterns:
        if isinstance(entry, URLResolver):
            inner = namespace
            if entry.namespace:
                inner = f"{namespace}:{entry.namespace}" if namespace else entry.namespace
            yield from _walk(entry.url_patterns, prefix + str(entry.pattern), inner)
        elif isinstance(entry, URLPattern):
            name = entry.name or ""
            if name and namespace:
                name = f"{namespace}:{name}"
            yield Route(prefix + str(entry.pattern), name, entry.callback)


def http_routes() -> list[Route]:
    """Every HTTP route of the URL configuration (admin included, static files are served
    outside it by the ASGI handler)."""
    routes = list(_walk(get_resolver().url_patterns, "", ""))
    return [route for route in routes if not route.pattern.startswith("static/")]


def websocket_routes() -> list[Route]:
    from orchestrator.asgi import websocket_urlpatterns

    return list(_walk(websocket_urlpatterns, "", ""))
