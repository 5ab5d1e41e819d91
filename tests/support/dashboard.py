"""Helpers for the operators' dashboard tests: operators, sessions, sockets, steps moved in
this process (for tests that need no worker), and workflows that use the ledger tools."""

from __future__ import annotations

import json
from typing import Any

from django.contrib.auth import get_user_model
from django.test import Client
from websockets.sync.client import ClientConnection, connect

from jobs.models import Run, StepRun, StepStatus
from jobs.transitions.steps import step_claim, step_complete, step_fail
from tests.support.workflows import dispatch_token_of

PASSWORD = "operator password 1234"


def make_operator(username: str = "olga"):
    return get_user_model().objects.create_user(username=username, password=PASSWORD, is_staff=True)


def make_user(username: str, **fields: Any):
    return get_user_model().objects.create_user(username=username, password=PASSWORD, **fields)


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def session_cookie(user) -> str:
    return f"sessionid={signed_in(user).cookies['sessionid'].value}"


def dashboard_socket(
    base_url: str, cookie: str | None, path: str = "/ws/dashboard/?view=overview"
) -> ClientConnection:
    headers = {"Origin": base_url}
    if cookie:
        headers["Cookie"] = cookie
    return connect(
        base_url.replace("http://", "ws://") + path, additional_headers=headers, open_timeout=10
    )


def next_frame(ws: ClientConnection, timeout: float = 20) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=timeout))


def work_locally(run: Run, *, fail: frozenset[str] = frozenset(), worker: str = "local@test/1"):
    """Do what the scheduler and workers would with every ready step of `run`, in this process:
    steps named in `fail` fail for good, others succeed with `{"step": id}`."""
    while True:
        ready = list(
            StepRun.objects.filter(run=run, status__in=[StepStatus.READY, StepStatus.QUEUED])
            .exclude(kind="map")
            .order_by("id")
        )
        if not ready:
            run.refresh_from_db()
            return run
        for step in ready:
            token = dispatch_token_of(step)
            claim = step_claim(step_run_id=step.pk, dispatch_token=token, worker=worker)
            if step.step_id in fail:
                step_fail(claim=claim, error=f"{step.step_id} broke", code="boom", retryable=False)
            else:
                step_complete(claim=claim, output={"step": step.step_id})


def chain(name: str, *step_ids: str, tool: str = "echo", **args: Any) -> dict[str, Any]:
    """A linear workflow: each step is a tool call after the previous one."""
    steps = []
    for index, step_id in enumerate(step_ids):
        step: dict[str, Any] = {"id": step_id, "kind": "tool", "tool": tool, "args": dict(args)}
        if index:
            step["after"] = [step_ids[index - 1]]
        steps.append(step)
    return {"name": name, "steps": steps}


def ledger_chain(name: str, key_prefix: str, *step_ids: str) -> dict[str, Any]:
    """A linear workflow of `test.count` steps, each recording its calls under its own key."""
    steps = []
    for index, step_id in enumerate(step_ids):
        step: dict[str, Any] = {
            "id": step_id,
            "kind": "tool",
            "tool": "test.count",
            "args": {"key": f"{key_prefix}-{step_id}"},
        }
        if index:
            step["after"] = [step_ids[index - 1]]
        steps.append(step)
    return {"name": name, "steps": steps}
