"""Structured logs: the tenant, run and step a log line is about, and a JSON format.

`bind_log_context(tenant=..., run=..., step=...)` sets the ids for the current thread or task
(a `ContextVar`, so threads and asyncio tasks each have their own); `jobs.execution` binds
them around each step it runs. `ContextFilter`, installed on the console handler by the
settings, copies them onto every record (`record.tenant_id`, `record.run_id`,
`record.step_id`, and `record.context`, a ` [tenant=… run=… step=…]` suffix for the plain
format). `LOG_FORMAT=json` selects `JsonFormatter`: one JSON object per line with those ids
as fields, for log shippers.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

_context: ContextVar[dict[str, str]] = ContextVar("switchyard_log_context", default={})  # noqa: B039

FIELDS = ("tenant", "run", "step")


def bind_log_context(**ids: Any) -> None:
    """Replace the current context with these ids (None values are left out)."""
    _context.set({name: str(value) for name, value in ids.items() if value is not None})


def clear_log_context() -> None:
    _context.set({})


def log_context() -> dict[str, str]:
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Adds the bound ids to each record; never filters anything out."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _context.get()
        record.tenant_id = ids.get("tenant")
        record.run_id = ids.get("run")
        record.step_id = ids.get("step")
        extra = " ".join(f"{name}={ids[name]}" for name in FIELDS if name in ids)
        record.context = f" [{extra}]" if extra else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for name in FIELDS:
            value = getattr(record, f"{name}_id", None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)
