"""Pure parts of the operators' dashboard: which steps a re-run resets, the log context and
its JSON format, relative times."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import pytest

from dashboard.layout import gantt_ticks
from dashboard.templatetags.dashboard_tags import ago, offset, relative, since_start
from jobs.definitions import parse_definition
from jobs.services.operations import steps_to_rerun
from jobs.steps import registry
from orchestrator.logcontext import (
    ContextFilter,
    JsonFormatter,
    bind_log_context,
    clear_log_context,
)


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_kinds", dict(registry._BUILTIN_KINDS))
    monkeypatch.setattr(registry, "_tools", {})
    registry.register_tool("echo")(lambda ctx, **args: args)


def tool(step_id, after=(), **args):
    return {"id": step_id, "kind": "tool", "tool": "echo", "after": list(after), "args": args}


def test_a_re_run_resets_the_step_and_everything_downstream_of_it_only():
    definition = parse_definition(
        {
            "name": "diamond",
            "steps": [
                tool("fetch"),
                tool("classify", ["fetch"]),
                tool("lookup", ["fetch"]),
                # depends on classify through its template, not `after`
                tool("draft", ["lookup"], label="{{ steps.classify.output }}"),
                tool("send", ["draft"]),
                tool("audit", ["fetch"]),
            ],
        }
    )

    assert steps_to_rerun(definition, "classify") == ["classify", "draft", "send"]
    assert steps_to_rerun(definition, "fetch") == [
        "fetch", "classify", "lookup", "draft", "send", "audit"
    ]  # fmt: skip
    assert steps_to_rerun(definition, "send") == ["send"]


def record(message: str = "claimed") -> logging.LogRecord:
    record = logging.LogRecord("jobs.execution", logging.INFO, __file__, 1, message, (), None)
    ContextFilter().filter(record)
    return record


def test_log_records_carry_the_bound_tenant_run_and_step():
    bind_log_context(tenant=7, run="4b1c…", step="classify")
    try:
        plain = record()
        as_json = json.loads(JsonFormatter().format(record("step done")))
    finally:
        clear_log_context()

    assert plain.context == " [tenant=7 run=4b1c… step=classify]"
    assert (as_json["tenant"], as_json["run"], as_json["step"]) == ("7", "4b1c…", "classify")
    assert as_json["message"] == "step done" and as_json["level"] == "INFO"
    assert record().context == "" and "tenant" not in json.loads(JsonFormatter().format(record()))


def test_times_are_relative_with_the_exact_time_on_hover():
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert relative(now - timedelta(seconds=12), now) == "12 s ago"
    assert relative(now - timedelta(minutes=5), now) == "5 min ago"
    assert relative(now + timedelta(hours=3), now) == "in 3 h"
    assert 'title="2026-11-28 11:55:00 UTC"' in ago(now - timedelta(minutes=5))


def test_event_times_are_offsets_from_the_runs_start_with_the_exact_time_on_hover():
    start = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert offset(0) == "+0.000s"
    assert offset(1.25) == "+1.250s"
    assert offset(0.05) != offset(0.1)  # a short run's events are told apart
    assert offset(125.5) == "+2m05.500s"
    assert offset(3725) == "+1h02m05s"
    assert offset(-0.002) == "-0.002s"
    html = since_start(start + timedelta(seconds=1, milliseconds=234), start)
    assert html == (
        '<time datetime="2026-11-28T12:00:01.234000+00:00" '
        'title="2026-11-28 12:00:01.234 UTC">+1.234s</time>'
    )
    # Milliseconds as a browser counts them (its Date drops the microseconds of both times).
    late = since_start(start + timedelta(microseconds=1_999), start + timedelta(microseconds=999))
    assert ">+0.001s<" in late


@pytest.mark.parametrize("span_s", [0.001, 0.0123, 0.12, 0.25, 0.9, 1, 3.7, 59, 125, 3725, 86400])
def test_timeline_ticks_are_round_distinct_and_within_the_span(span_s):
    ticks = gantt_ticks(span_s)
    labels = [label for _, label in ticks]
    positions = [x for x, _ in ticks]
    assert len(set(labels)) == len(labels) and 2 <= len(ticks) <= 5, labels
    assert positions[0] == 0 and positions == sorted(positions) and positions[-1] <= 100
    assert positions[-1] >= 50  # the ticks cover most of the span


def test_a_short_runs_timeline_labels_its_ticks_precisely():
    assert [label for _, label in gantt_ticks(0.12)] == ["+0.00s", "+0.05s", "+0.10s"]
    assert gantt_ticks(2) == [
        (0, "+0.0s"),
        (25, "+0.5s"),
        (50, "+1.0s"),
        (75, "+1.5s"),
        (100, "+2.0s"),
    ]
    assert [label for _, label in gantt_ticks(125)] == ["+0s", "+50s", "+100s"]
