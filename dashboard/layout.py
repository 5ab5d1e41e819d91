"""The run page's pictures (docs/dashboard.md): the workflow's graph laid out by dependency
depth, and the timeline (a Gantt chart) of each step's waits and attempts.

Pure layout over rows already read: no queries of its own beyond the run's definition.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone

from jobs.models import Run, StepRun, StepStatus
from jobs.transitions.txn import definition_of

# --- the graph -----------------------------------------------------------------------------


@dataclass
class GraphNode:
    step_id: str
    kind: str
    status: str
    x: float
    y: float
    items_done: int = 0
    items_total: int = 0
    optional: bool = False


@dataclass(frozen=True)
class GraphEdge:
    x1: float
    y1: float
    x2: float
    y2: float
    done: bool

    @property
    def path(self) -> str:
        """A horizontal S-curve from the dependency's right edge to the step's left edge."""
        bend = (self.x2 - self.x1) / 2
        return (
            f"M{self.x1:g},{self.y1:g} C{self.x1 + bend:g},{self.y1:g} "
            f"{self.x2 - bend:g},{self.y2:g} {self.x2:g},{self.y2:g}"
        )


@dataclass(frozen=True)
class Graph:
    nodes: list[GraphNode]
    edges: list[GraphEdge]
    width: float
    height: float
    node_width: float
    node_height: float


NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 150.0, 44.0, 56.0, 16.0, 8.0


def items_by_map(steps: list[StepRun]) -> dict[str, list[StepRun]]:
    """The items of each map step, by the map's step id."""
    items: dict[str, list[StepRun]] = defaultdict(list)
    for step in steps:
        if step.map_index is not None:
            items[step.step_id].append(step)
    return items


def map_items_done(map_items: list[StepRun]) -> int:
    return sum(i.status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED) for i in map_items)


def run_graph(run: Run, steps: list[StepRun]) -> Graph:
    """The workflow's steps laid out by dependency depth (columns), each with its status."""
    definition = definition_of(run.workflow_version)
    by_key = {(s.step_id, s.map_index): s for s in steps}
    items = items_by_map(steps)
    depth: dict[str, int] = {}
    for step_def in definition.steps:  # topological order
        depth[step_def.id] = 1 + max((depth[d] for d in step_def.depends_on), default=-1)
    columns: dict[int, list[str]] = defaultdict(list)
    for step_def in definition.steps:
        columns[depth[step_def.id]].append(step_def.id)
    tallest = max((len(c) for c in columns.values()), default=1)
    nodes: dict[str, GraphNode] = {}
    for column, ids in columns.items():
        offset = (tallest - len(ids)) * (NODE_H + GAP_Y) / 2
        for row, step_id in enumerate(ids):
            step_def = definition.step(step_id)
            row_step = by_key.get((step_id, None))
            map_items = items.get(step_id, [])
            nodes[step_id] = GraphNode(
                step_id=step_id,
                kind=step_def.kind,
                status=row_step.status if row_step else StepStatus.PENDING,
                x=PAD + column * (NODE_W + GAP_X),
                y=PAD + offset + row * (NODE_H + GAP_Y),
                items_done=map_items_done(map_items),
                items_total=len(map_items),
                optional=step_def.optional,
            )
    edges = []
    for step_def in definition.steps:
        target = nodes[step_def.id]
        for dependency in sorted(step_def.depends_on):
            source = nodes[dependency]
            edges.append(
                GraphEdge(
                    x1=source.x + NODE_W,
                    y1=source.y + NODE_H / 2,
                    x2=target.x,
                    y2=target.y + NODE_H / 2,
                    done=source.status in ("succeeded", "skipped"),
                )
            )
    width = PAD * 2 + len(columns) * NODE_W + max(0, len(columns) - 1) * GAP_X
    height = PAD * 2 + tallest * NODE_H + max(0, tallest - 1) * GAP_Y
    return Graph(list(nodes.values()), edges, width, height, NODE_W, NODE_H)


@dataclass(frozen=True)
class GanttBar:
    x: float  # percent of the run's span
    width: float
    css: str  # queued, attempt-succeeded, attempt-failed, ...
    title: str


@dataclass(frozen=True)
class GanttRow:
    label: str
    status: str
    bars: list[GanttBar]


@dataclass(frozen=True)
class Gantt:
    rows: list[GanttRow]
    start: datetime
    end: datetime
    span_s: float
    ticks: list[tuple[float, str]]


GANTT_ROWS = 60


def run_gantt(run: Run, steps: list[StepRun], now: datetime | None = None) -> Gantt:
    """Per step (map items included, up to GANTT_ROWS rows): waits and attempts over time."""
    now = now or timezone.now()
    start = run.created_at
    end = run.finished_at or now
    for step in steps:
        for attempt in step.attempts.all():
            end = max(end, attempt.finished_at or now)
    span = max((end - start).total_seconds(), 0.001)

    def pos(at: datetime) -> float:
        return round(100 * max(0.0, (at - start).total_seconds()) / span, 3)

    rows = []
    ordered = sorted(
        steps, key=lambda s: (s.started_at or s.ready_at or now, s.step_id, s.map_index or -1)
    )
    for step in ordered[:GANTT_ROWS]:
        bars = []
        attempts = list(step.attempts.all())
        first_start = attempts[0].started_at if attempts else step.started_at
        map_row = step.kind == "map" and step.map_index is None
        if step.ready_at and first_start and first_start > step.ready_at and not map_row:
            bars.append(
                GanttBar(
                    pos(step.ready_at),
                    max(0.3, pos(first_start) - pos(step.ready_at)),
                    "wait",
                    f"waited {(first_start - step.ready_at).total_seconds():.2f}s for a worker",
                )
            )
        for attempt in attempts:
            finish = attempt.finished_at or now
            seconds = (finish - attempt.started_at).total_seconds()
            bars.append(
                GanttBar(
                    pos(attempt.started_at),
                    max(0.3, pos(finish) - pos(attempt.started_at)),
                    f"attempt-{attempt.outcome}",
                    f"attempt {attempt.number}: {attempt.outcome}, {seconds:.2f}s"
                    + (f" on {attempt.worker}" if attempt.worker else "")
                    + (f" — {attempt.error[:200]}" if attempt.error else ""),
                )
            )
        if not attempts and step.started_at:
            finish = step.finished_at or now
            bars.append(
                GanttBar(
                    pos(step.started_at),
                    max(0.3, pos(finish) - pos(step.started_at)),
                    f"attempt-{step.status}",
                    f"{step.status}, {(finish - step.started_at).total_seconds():.2f}s",
                )
            )
        rows.append(GanttRow(step.key, step.status, bars))
    return Gantt(rows, start, end, span, gantt_ticks(span))


def gantt_ticks(span_s: float, most: int = 5) -> list[tuple[float, str]]:
    """At most `most` ticks over `span_s` seconds: (percent of the span, label).

    A round step (1, 2 or 5 times a power of ten seconds) and as many decimals as it needs, so
    that no two labels read the same: a 0.12 s run gets `+0.00s +0.05s +0.10s`, not
    `+0.0s +0.0s +0.1s`.
    """
    wanted = span_s / (most - 1)
    magnitude = 10 ** math.floor(math.log10(wanted))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= wanted * (1 - 1e-9))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    count = math.floor(span_s / step * (1 + 1e-9)) + 1
    return [(round(100 * n * step / span_s, 1), f"+{n * step:.{decimals}f}s") for n in range(count)]
