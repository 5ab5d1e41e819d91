"""The invariants (docs/architecture.md, section 7), checked over all that the chaos run accepted.

Each check returns figures and a list of violations (strings naming the run and step); an
empty list is a pass. They read the private database, the ledger and the client API.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import httpx
from django.db import connection

from jobs import templating
from jobs.models import Event, Run, StepAttempt, StepRun, StepStatus
from jobs.statuses import RUN_FINAL
from jobs.transitions.txn import definition_of
from tests.reliability.workload import Followed, Submission

# Kinds whose executions the plugin records (a `workflow` step's output is its child's).
LEDGER_KINDS = ("llm", "tool", "retrieval")
# Steps that still need a worker or the scheduler: none may be left once every run is final.
OPEN_STEP = (StepStatus.READY, StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.RETRY_WAIT)


def _ledger() -> dict[tuple[str, str], list[dict[str, Any]]]:
    rows: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT exec_id, run_id, step_key, attempt, started_at, finished_at, result "
            "FROM chaos_ledger ORDER BY id"
        )
        for exec_id, run_id, step_key, attempt, started, finished, result in cursor.fetchall():
            rows[(str(run_id), step_key)].append(
                {
                    "exec": str(exec_id),
                    "attempt": attempt,
                    "started_at": started,
                    "finished_at": finished,
                    # Django reads jsonb as text (its JSONField parses it): parse it here.
                    "result": json.loads(result) if isinstance(result, str) else result,
                }
            )
    return rows


def check_runs_final(submissions: list[Submission]) -> tuple[dict[str, int], list[str]]:
    """Every run a client was answered 202/200 for exists and ended; so did every other run."""
    problems = []
    by_id = {
        str(public_id): status
        for public_id, status in Run.objects.values_list("public_id", "status")
    }
    accepted = [s for s in submissions if s.run_id]
    lost = [s for s in accepted if s.run_id not in by_id]
    problems += [f"run {s.run_id} (key {s.key}) was answered 202 but does not exist" for s in lost]
    unfinished = [rid for rid, status in by_id.items() if status not in RUN_FINAL]
    problems += [f"run {rid} is not final ({by_id[rid]})" for rid in unfinished]
    statuses = Counter(by_id[s.run_id] for s in accepted if s.run_id in by_id)
    unanswered = [s for s in submissions if not s.run_id]
    problems += [
        f"submission {s.key} never got its run: {s.status_codes} {s.errors[-3:]}"
        for s in unanswered
    ]
    return {
        "submitted": len(submissions),
        "accepted": len(accepted),
        "retried_submissions": sum(s.retried for s in accepted),
        "runs_in_database": len(by_id),
        "child_runs": Run.objects.filter(parent_step__isnull=False).count(),
        "completed": sum(status in RUN_FINAL for status in by_id.values()),
        "succeeded": statuses["succeeded"],
        "failed": statuses["failed"],
        "lost": len(lost) + len(unfinished),
    }, problems


def check_idempotency(submissions: list[Submission]) -> tuple[dict[str, int], list[str]]:
    """One key, one run: the run a client ends up with is the one its key holds."""
    problems = []
    keys = dict(Run.objects.exclude(idempotency_key="").values_list("idempotency_key", "public_id"))
    for submission in submissions:
        if submission.run_id and str(keys.get(submission.key)) != submission.run_id:
            problems.append(
                f"key {submission.key}: client got {submission.run_id}, "
                f"the key holds {keys.get(submission.key)}"
            )
    client_runs = {s.run_id for s in submissions if s.run_id}
    orphans = Run.objects.filter(parent_step__isnull=True).exclude(
        idempotency_key__in=[s.key for s in submissions]
    )
    # Runs the driver made itself (canaries, poison, long steps) carry no key.
    orphans = orphans.exclude(idempotency_key="")
    problems += [f"run {run.public_id} has a key no client used" for run in orphans]
    return {
        "keys": len(keys),
        "replayed": sum(1 for s in submissions if s.run_id and s.retried),
        "client_runs": len(client_runs),
    }, problems


def check_ledger(exclude_runs: set[str]) -> tuple[dict[str, int], list[str]]:
    """At most one committed execution per step; the checkpoint is that execution's result.

    An execution is committed when the step's stored output carries its `exec` id. A
    duplicate is a second attempt whose success was accepted, or any execution that started
    after the step's output was committed (it ran again although its output was stored).
    """
    problems: list[str] = []
    ledger = _ledger()
    committed: list[str] = []
    executions = sum(len(rows) for rows in ledger.values())
    duplicates = 0
    steps = StepRun.objects.filter(kind__in=LEDGER_KINDS).select_related("run")
    succeeded_attempts = Counter(
        StepAttempt.objects.filter(outcome="succeeded").values_list("step_run_id", flat=True)
    )
    checked = 0
    for step in steps.iterator():
        run_id = str(step.run.public_id)
        if run_id in exclude_runs:
            continue
        rows = ledger.get((run_id, step.key), [])
        if succeeded_attempts[step.pk] > 1:
            duplicates += 1
            count = succeeded_attempts[step.pk]
            problems.append(f"{run_id}:{step.key}: {count} attempts succeeded")
        if step.status != StepStatus.SUCCEEDED:
            continue
        checked += 1
        exec_id = (step.output or {}).get("exec")
        mine = [row for row in rows if row["exec"] == exec_id]
        if len(mine) != 1:
            problems.append(f"{run_id}:{step.key}: output exec {exec_id} not in the ledger")
            continue
        if mine[0]["result"] != step.output:
            problems.append(f"{run_id}:{step.key}: output differs from its execution's result")
        committed.append(exec_id)
        again = [row for row in rows if row["started_at"] > step.finished_at]
        if again:
            duplicates += len(again)
            problems.append(
                f"{run_id}:{step.key}: executed {len(again)} more time(s) after its commit"
            )
    with connection.cursor() as cursor:
        cursor.execute("UPDATE chaos_ledger SET committed = (exec_id::text = ANY(%s))", [committed])
    return {
        "executions": executions,
        "committed_executions": len(committed),
        "uncommitted_executions": executions - len(committed),
        "steps_checked": checked,
        "duplicate_committed_executions": duplicates,
    }, problems


def check_event_logs() -> tuple[dict[str, int], list[str]]:
    problems = []
    seqs: dict[int, list[int]] = defaultdict(list)
    for run_id, seq in Event.objects.order_by("run_id", "seq").values_list("run_id", "seq"):
        seqs[run_id].append(seq)
    next_seq = dict(Run.objects.values_list("pk", "next_seq"))
    for run_pk, expected_next in next_seq.items():
        found = seqs.get(run_pk, [])
        if found != list(range(1, expected_next)):
            problems.append(f"run #{run_pk}: event seqs are not 1..{expected_next - 1}")
    return {"runs": len(next_seq), "events": sum(len(v) for v in seqs.values())}, problems


def _rendered_output(run: Run, ledger, cache: dict[int, Any]) -> Any:
    """The run's output as its definition renders it from the ledger's committed results."""
    if run.pk in cache:
        return cache[run.pk]
    definition = definition_of(run.workflow_version)
    run_id = str(run.public_id)
    steps: dict[str, Any] = {}
    rows = {step.key: step for step in run.steps.all()}
    for step_def in definition.steps:
        step = rows[step_def.id]
        output = None
        if step.status == StepStatus.SUCCEEDED:
            output = _ledger_output(run, step, rows, ledger, cache, run_id)
        steps[step_def.id] = {"output": output, "status": step.status}
    output = templating.render(definition.output, {"input": run.input, "steps": steps})
    cache[run.pk] = output
    return output


def _ledger_output(run, step, rows, ledger, cache, run_id):
    if step.kind == "map":
        items = sorted(
            (s for s in rows.values() if s.step_id == step.step_id and s.map_index is not None),
            key=lambda s: s.map_index,
        )
        return [
            _committed_result(ledger, run_id, item.key, item.output)
            if item.status == StepStatus.SUCCEEDED
            else None
            for item in items
        ]
    if step.kind == "workflow":
        child = Run.objects.get(parent_step=step)
        return _rendered_output(child, ledger, cache)
    return _committed_result(ledger, run_id, step.key, step.output)


def _committed_result(ledger, run_id: str, key: str, output: Any) -> Any:
    exec_id = (output or {}).get("exec")
    for row in ledger.get((run_id, key), []):
        if row["exec"] == exec_id:
            return row["result"]
    return {"missing from the ledger": key}


def check_outputs(exclude_runs: set[str]) -> tuple[dict[str, int], list[str]]:
    problems = []
    ledger = _ledger()
    cache: dict[int, Any] = {}
    compared = 0
    runs = Run.objects.filter(status="succeeded").select_related("workflow_version")
    for run in runs.prefetch_related("steps"):
        if str(run.public_id) in exclude_runs:
            continue
        compared += 1
        expected = _rendered_output(run, ledger, cache)
        if expected != run.output:
            problems.append(f"run {run.public_id}: output {run.output!r} != {expected!r}")
    return {"outputs_compared": compared}, problems


def check_nothing_left_behind() -> tuple[dict[str, int], list[str]]:
    left = StepRun.objects.filter(status__in=OPEN_STEP)
    problems = [f"step {step} left {step.status}" for step in left[:20]]
    return {"open_steps": left.count()}, problems


def check_api_counts(base_url: str, keys: dict[str, str]) -> tuple[dict[str, int], list[str]]:
    """Per tenant and status, the API's run list counts what the database holds."""
    problems = []
    from tenants.models import Tenant

    listed = 0
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for slug, key in keys.items():
            tenant = Tenant.objects.get(slug=slug)
            headers = {"Authorization": f"Bearer {key}"}
            for status in ("accepted", "running", "waiting", "succeeded", "failed", "cancelled"):
                url: str | None = f"/api/v1/runs/?status={status}&limit=200"
                count = 0
                while url:
                    page = client.get(url, headers=headers).raise_for_status().json()
                    count += len(page["runs"])
                    url = page["next"]
                in_db = Run.objects.filter(tenant=tenant, status=status).count()
                listed += count
                if count != in_db:
                    problems.append(f"{slug} {status}: API lists {count}, database has {in_db}")
    return {"runs_listed": listed}, problems


def check_run_details(
    base_url: str, keys: dict[str, str], submissions: list[Submission]
) -> tuple[dict[str, int], list[str]]:
    """What a client reads for its run is what the database holds (every retried
    submission, and a sample of the others)."""
    problems = []
    runs = {str(run.public_id): run for run in Run.objects.filter(parent_step__isnull=True)}
    answered = [s for s in submissions if s.run_id]
    sample = [s for s in answered if s.retried] + [s for s in answered if not s.retried][::3]
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for submission in sample:
            if not submission.run_id:
                continue
            headers = {"Authorization": f"Bearer {keys[submission.tenant]}"}
            response = client.get(f"/api/v1/runs/{submission.run_id}/", headers=headers)
            run = runs.get(submission.run_id)
            if response.status_code != 200 or run is None:
                problems.append(f"run {submission.run_id}: GET answered {response.status_code}")
                continue
            body = response.json()
            if body["status"] != run.status or body["output"] != run.output:
                problems.append(f"run {submission.run_id}: API shows {body['status']}")
    return {"details_read": len(sample)}, problems


def check_streams(followed: list[Followed]) -> tuple[dict[str, int], list[str]]:
    """What an SSE client read, joined across its reconnections, is the stored log exactly."""
    problems = []
    complete = 0
    runs = {str(run.public_id): run.pk for run in Run.objects.all()}
    for stream in followed:
        if not stream.finished:
            continue
        complete += 1
        stored = list(
            Event.objects.filter(run_id=runs[stream.run_id])
            .order_by("seq")
            .values_list("seq", "type")
        )
        got = list(zip(stream.seqs, stream.types, strict=True))
        if got != stored:
            first = next(
                (i for i, pair in enumerate(zip(got, stored, strict=False)) if pair[0] != pair[1]),
                min(len(got), len(stored)),
            )
            problems.append(
                f"stream of {stream.run_id}: read {len(got)} events, the log has {len(stored)}"
                f" (reconnects {stream.reconnects}); first difference at #{first}:"
                f" read {got[first : first + 2]}, stored {stored[first : first + 2]}"
            )
    return {
        "streams_followed": len(followed),
        "streams_complete": complete,
        "stream_reconnects": sum(s.reconnects for s in followed),
    }, problems
