"""Template helpers of the dashboard: relative times with the exact time on hover, durations."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html

register = template.Library()


def relative(value: datetime, now: datetime | None = None) -> str:
    """`12 s ago`, `5 min ago`, `3 h ago`, `2 d ago`, or `in 4 min` for the future."""
    now = now or timezone.now()
    seconds = (now - value).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 1:
        return "just now"
    if seconds < 60:
        text = f"{seconds:.0f} s"
    elif seconds < 3600:
        text = f"{seconds / 60:.0f} min"
    elif seconds < 86400:
        text = f"{seconds / 3600:.0f} h"
    else:
        text = f"{seconds / 86400:.0f} d"
    return f"in {text}" if future else f"{text} ago"


@register.filter
def ago(value: datetime | None) -> str:
    """A `<time>` showing a relative time, with the exact UTC time in its title."""
    if value is None:
        return "—"
    exact = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return format_html(
        '<time datetime="{}" title="{}" data-rel>{}</time>',
        value.isoformat(),
        exact,
        relative(value),
    )


def offset(seconds: float) -> str:
    """A time since a start, to the millisecond: `+1.234s`, `+2m05.000s`, `+1h02m05s`."""
    sign = "-" if seconds < 0 else "+"
    seconds = abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds:.3f}s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{sign}{minutes:.0f}m{rest:06.3f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{sign}{hours:.0f}h{minutes:02.0f}m{rest:02.0f}s"


@register.filter
def since_start(value: datetime, start: datetime) -> str:
    """A `<time>` showing how long after `start` (a run's acceptance) `value` was, with the
    exact UTC time in its title: an event log reads as a sequence, not as "1 min ago" repeated.
    """
    # To the millisecond, as a browser's Date holds them: rows that the page's script adds
    # live read exactly as these do after a reload.
    ms = value.replace(microsecond=value.microsecond // 1000 * 1000)
    start = start.replace(microsecond=start.microsecond // 1000 * 1000)
    exact = ms.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
    return format_html(
        '<time datetime="{}" title="{}">{}</time>',
        value.isoformat(),
        exact,
        offset((ms - start).total_seconds()),
    )


@register.filter
def seconds(value: float | None) -> str:
    """A duration in seconds, readable: `350 ms`, `4.2 s`, `3 min 5 s`."""
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.1f} s"
    minutes, rest = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


@register.filter
def between(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return "—"
    return seconds(((end or timezone.now()) - start).total_seconds())


@register.filter
def ms(value: float | None) -> str:
    return "—" if value is None else seconds(value / 1000)


@register.filter
def css_name(value: str) -> str:
    """`step.attempt_lost` → `step-attempt-lost` (an event type as a CSS class suffix)."""
    return value.replace(".", "-").replace("_", "-")


@register.filter
def num(value: int | float | None) -> str:
    """12,345: thousands separated."""
    return "—" if value is None else f"{value:,}"


@register.filter
def json_compact(value: Any) -> str:
    """An event's data on one line."""
    if value in (None, {}, []):
        return ""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)


@register.simple_tag
def query(base: str, **overrides: str) -> str:
    """`base` (an encoded query string) with some parameters replaced, as `?…`."""
    from urllib.parse import parse_qsl, urlencode

    params = dict(parse_qsl(base))
    params.update({name: value for name, value in overrides.items() if value is not None})
    return "?" + urlencode({name: value for name, value in params.items() if value != ""})


@register.simple_tag
def sort_link(base: str, current: str, key: str, label: str, descending_first: bool = False):
    """A link that sorts a list by `key` (`?sort=key`, or `-key` for descending), from its
    first page. The link of the current sort turns its direction around; a count sorts from
    the largest first (`descending_first`)."""
    if current.removeprefix("-") == key:
        descending = current.startswith("-")
        target = key if descending else f"-{key}"
        return format_html(
            '<a href="{}" class="on" data-sort="{}" aria-current="true">{} {}</a>',
            query(base, sort=target, page=""),
            key,
            label,
            "↓" if descending else "↑",
        )
    target = f"-{key}" if descending_first else key
    return format_html(
        '<a href="{}" data-sort="{}">{}</a>', query(base, sort=target, page=""), key, label
    )
