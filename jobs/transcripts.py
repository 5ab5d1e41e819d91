"""The transcripts of a run's agent steps (their turns and tool calls, from the rows of the
agents' children), for the API's run detail and the dashboard's run page."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from jobs.formats import iso
from jobs.models import StepRun
from jobs.steps import agent


def agent_transcripts(steps: Iterable[StepRun]) -> dict[str, list[dict[str, Any]]]:
    """Each agent step among a run's `steps` (all of them, as loaded), by step id, with its
    transcript (`agent.transcript`); empty when the run has no agent step. Times are ISO
    text. Reads nothing more from the database."""
    steps = list(steps)
    children: dict[str, dict[int, dict[str, Any]]] = {
        step.step_id: {} for step in steps if step.kind == agent.KIND and step.map_index is None
    }
    for step in steps:
        if step.map_index is None or step.step_id not in children:
            continue
        started, finished = step.started_at, step.finished_at
        duration = (finished - started).total_seconds() * 1000 if started and finished else None
        children[step.step_id][step.map_index] = {
            "status": step.status,
            "output": step.output,
            "error": step.error,
            "started_at": iso(started),
            "finished_at": iso(finished),
            "duration_ms": round(duration) if duration is not None else None,
        }
    return {step_id: agent.transcript(found) for step_id, found in children.items()}
