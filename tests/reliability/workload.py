"""The chaos suite's steady load: workflow definitions, submitting clients and stream followers.

Clients behave as the API asks clients to: every submission carries an Idempotency-Key, and a
client that gets no answer (connection refused or reset, a timeout, a 5xx) or a 429/503
retries the same body with the same key until it gets its 202 (or 200). What each client saw
is kept, so that the checks can hold the server to it: a run answered 202 must exist and end;
one key must never make two runs.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

# Steps give up well before their lease (timeout + grace) so that a worker that dies or stalls
# is found within seconds, not the default five minutes.
STEP_TIMEOUT_S = 6
RETRY = {"max_attempts": 8, "backoff_s": 0.2, "max_backoff_s": 2}


def _llm(step_id: str, prompt: str, *, fail_rate: float = 0.0, **fields: Any) -> dict[str, Any]:
    return {
        "id": step_id,
        "kind": "llm",
        "provider": "simulated",
        "prompt": prompt,
        # Streams its text (deltas) for about a second: a worker killed now is mid-stream.
        "simulated": {
            "latency_ms": 150,
            "jitter_ms": 50,
            "tokens_per_second": 40,
            "fail_rate": fail_rate,
        },
        "retry": RETRY,
        "timeout_s": STEP_TIMEOUT_S,
        **fields,
    }


def _work(step_id: str, value: Any, *, sleep_ms: int = 300, fail_rate: float = 0.0, **fields):
    return {
        "id": step_id,
        "kind": "tool",
        "tool": "chaos.work",
        "args": {"value": value, "sleep_ms": sleep_ms, "fail_rate": fail_rate},
        "retry": RETRY,
        "timeout_s": STEP_TIMEOUT_S,
        **fields,
    }


FANOUT = {
    "name": "fanout",
    "input_schema": {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}},
    "steps": [
        {
            "id": "plan",
            "kind": "tool",
            "tool": "chaos.items",
            "args": {"n": "{{ input.n }}"},
            "retry": RETRY,
            "timeout_s": STEP_TIMEOUT_S,
        },
        {
            "id": "each",
            "kind": "map",
            "over": "{{ steps.plan.output.items }}",
            "max_parallel": 3,
            "step": {
                "kind": "tool",
                "tool": "chaos.work",
                "args": {"value": "{{ item }}", "sleep_ms": 250, "fail_rate": 0.2},
                "retry": RETRY,
                "timeout_s": STEP_TIMEOUT_S,
            },
        },
        _llm("summary", "Summarise {{ steps.each.output | length }} results", fail_rate=0.2),
    ],
    "output": {
        "values": "{{ steps.each.output }}",
        "summary": "{{ steps.summary.output.text }}",
        "plan": "{{ steps.plan.output.exec }}",
    },
}

BRANCHES = {
    "name": "branches",
    "input_schema": {"type": "object", "required": ["topic"]},
    "steps": [
        _llm(
            "classify",
            "Classify {{ input.topic }}",
            fail_rate=0.3,
            simulated={
                "latency_ms": 150,
                "tokens_per_second": 40,
                "fail_rate": 0.3,
                "choices": ["deep", "shallow"],
            },
        ),
        _work("left", "{{ input.topic }}-left", fail_rate=0.2),
        {
            "id": "search",
            "kind": "retrieval",
            "query": "{{ input.topic }}",
            "top_k": 2,
            "retry": RETRY,
            "timeout_s": STEP_TIMEOUT_S,
        },
        _work(
            "deep",
            "{{ steps.left.output.value }}",
            after=["classify"],
            when="steps.classify.output.text == 'deep'",
        ),
        _work(
            "join",
            "{{ steps.classify.output.text }}/{{ steps.search.output.documents | length }}",
            after=["deep", "left", "search"],
        ),
    ],
    "output": {
        "join": "{{ steps.join.output.value }}",
        "deep": "{{ steps.deep.output }}",
        "left": "{{ steps.left.output.exec }}",
    },
}

CHILD = {
    "name": "child",
    "steps": [
        _llm("draft", "Draft for {{ input.x }}", fail_rate=0.1),
        _work("store", "{{ input.x }}-stored", fail_rate=0.1),
    ],
    "output": {"draft": "{{ steps.draft.output.text }}", "store": "{{ steps.store.output }}"},
}

PARENT = {
    "name": "parent",
    "steps": [
        _work("prep", "prepared"),
        {
            "id": "sub",
            "kind": "workflow",
            "workflow": "child",
            "input": {"x": "{{ steps.prep.output.value }}"},
            "retry": RETRY,
            "timeout_s": STEP_TIMEOUT_S,
        },
        _work("finish", "{{ steps.sub.output.store.value }}", after=["sub"]),
    ],
    "output": {"sub": "{{ steps.sub.output }}", "finish": "{{ steps.finish.output }}"},
}

CANARY = {
    "name": "canary",
    "steps": [
        _work("ping", "ping", sleep_ms=0),
        _llm(
            "pong",
            "pong",
            after=["ping"],
            simulated={"latency_ms": 50, "tokens_per_second": 400},
        ),
    ],
    "output": "{{ steps.pong.output.text }}",
}

POISON = {
    "name": "poison",
    "steps": [
        {
            "id": "pill",
            "kind": "tool",
            "tool": "chaos.poison",
            "retry": {"max_attempts": 2, "backoff_s": 0.1},
            "timeout_s": STEP_TIMEOUT_S,
        }
    ],
}


def long_step(seconds: float) -> dict[str, Any]:
    return {
        "name": "long",
        "steps": [
            {
                "id": "slow",
                "kind": "tool",
                "tool": "chaos.long",
                "args": {"seconds": seconds},
                "retry": {"max_attempts": 3, "backoff_s": 0.1},
                "timeout_s": seconds * 3,
            }
        ],
        "output": "{{ steps.slow.output.slept_s }}",
    }


# Many of these accepted at once for one tenant at the default quotas (the driver's map
# bursts): each run's map row is `running` (waiting for its items, on no worker) from its
# acceptance, so a burst of more runs than the tenant's `max_concurrent_steps` has more waiting
# map rows than the quota has slots.
QUICK_LLM = {"latency_ms": 125, "jitter_ms": 75}  # 50-200 ms, streamed in slices
MAP_BURST = {
    "name": "mapburst",
    "input_schema": {"type": "object", "required": ["items"]},
    "steps": [
        _llm("draft", "Draft {{ input['items'] }}", simulated=QUICK_LLM),
        _llm(
            "refine",
            "Refine {{ steps.draft.output.text }}",
            after=["draft"],
            simulated=QUICK_LLM,
        ),
        _work("lookup", "{{ input['items'] }}", sleep_ms=0),
        {
            "id": "each",
            "kind": "map",
            "over": "{{ input['items'] }}",
            "step": {
                "kind": "llm",
                "provider": "simulated",
                "prompt": "Item {{ item }}",
                "simulated": QUICK_LLM,
                "retry": RETRY,
                "timeout_s": STEP_TIMEOUT_S,
            },
        },
        _work(
            "finish",
            "{{ steps.each.output | length }}",
            sleep_ms=0,
            after=["refine", "lookup", "each"],
        ),
    ],
    "output": {"finish": "{{ steps.finish.output.value }}", "lookup": "{{ steps.lookup.output }}"},
}
# More runs than the default `max_concurrent_steps` (50).
MAP_BURST_RUNS = 60

LOAD_WORKFLOWS = (FANOUT, BRANCHES, CHILD, PARENT, MAP_BURST)
DOCUMENTS = [
    {"title": "Refund policy", "text": "Refunds are possible within 30 days of an invoice."},
    {"title": "Shipping", "text": "Parcels ship within two days; tracking links come by mail."},
    {"title": "Accounts", "text": "Passwords are reset from the sign-in page."},
]
TOPICS = ("refund", "shipping", "invoice", "password", "tracking", "weather")


def load_request(rng: random.Random) -> dict[str, Any]:
    choice = rng.random()
    if choice < 0.4:
        return {"workflow": "fanout", "input": {"n": rng.randint(2, 4)}}
    if choice < 0.75:
        return {"workflow": "branches", "input": {"topic": rng.choice(TOPICS)}}
    return {"workflow": "parent", "input": {}}


# --- submitting clients -----------------------------------------------------------------------


@dataclass
class Submission:
    tenant: str
    key: str
    body: dict[str, Any]
    started: float
    run_id: str | None = None
    answered: float | None = None
    status_codes: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def retried(self) -> bool:
        return len(self.status_codes) + len(self.errors) > 1


class Clients:
    """Submitting threads (each a client of one tenant at a time) against the web process."""

    def __init__(self, base_url: str, keys: dict[str, str], *, threads: int, rate_per_s: float):
        self.base_url = base_url
        self.keys = keys
        self.threads = threads
        self.interval_s = threads / rate_per_s
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.submissions: list[Submission] = []
        self._workers: list[threading.Thread] = []
        # Submission latency (first try only, answered 202) per second of the run.
        self.latencies: list[tuple[float, float]] = []

    def start(self) -> None:
        for index in range(self.threads):
            thread = threading.Thread(target=self._loop, args=(index,), daemon=True)
            thread.start()
            self._workers.append(thread)

    def stop(self, timeout: float = 90) -> None:
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._workers:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))

    def accepted(self) -> list[Submission]:
        with self.lock:
            return [s for s in self.submissions if s.run_id]

    def _loop(self, index: int) -> None:
        rng = random.Random(index)
        tenants = sorted(self.keys)
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            while not self.stopping.is_set():
                tenant = tenants[rng.randrange(len(tenants))]
                self.submit(client, tenant, load_request(rng))
                self.stopping.wait(rng.uniform(0.5, 1.5) * self.interval_s)

    def submit(
        self, client: httpx.Client, tenant: str, body: dict[str, Any], give_up_s: float = 120
    ) -> Submission:
        submission = Submission(tenant, f"chaos-{uuid.uuid4()}", body, time.monotonic())
        with self.lock:
            self.submissions.append(submission)
        headers = {
            "Authorization": f"Bearer {self.keys[tenant]}",
            "Idempotency-Key": submission.key,
        }
        delay = 0.2
        while time.monotonic() - submission.started < give_up_s:
            sent = time.monotonic()
            try:
                response = client.post("/api/v1/runs/", json=body, headers=headers)
            except httpx.HTTPError as exc:
                submission.errors.append(type(exc).__name__)
            else:
                submission.status_codes.append(response.status_code)
                if response.status_code in (200, 202):
                    submission.run_id = response.json()["id"]
                    submission.answered = time.monotonic()
                    if len(submission.status_codes) == 1 and not submission.errors:
                        self.latencies.append((sent, submission.answered - sent))
                    return submission
                if response.status_code < 500 and response.status_code not in (429, 503):
                    submission.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    return submission
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        return submission


# --- live stream followers ----------------------------------------------------------------------


@dataclass
class Followed:
    run_id: str
    seqs: list[int] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    reconnects: int = 0
    finished: bool = False
    error: str = ""


class Followers:
    """Threads that follow runs' SSE streams to their end, reconnecting with Last-Event-ID."""

    def __init__(self, base_url: str, keys: dict[str, str], clients: Clients, *, threads: int):
        self.base_url = base_url
        self.keys = keys
        self.clients = clients
        self.threads = threads
        self.stopping = threading.Event()
        self.followed: list[Followed] = []
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.threads):
            thread = threading.Thread(target=self._loop, args=(index,), daemon=True)
            thread.start()
            self._workers.append(thread)

    def stop(self, timeout: float = 90) -> None:
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._workers:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))

    def _loop(self, index: int) -> None:
        rng = random.Random(1000 + index)
        while not self.stopping.is_set():
            accepted = self.clients.accepted()[-20:]
            if not accepted:
                self.stopping.wait(0.5)
                continue
            submission = rng.choice(accepted)
            followed = Followed(submission.run_id)
            self.followed.append(followed)
            self.follow(followed, self.keys[submission.tenant])

    def follow(self, followed: Followed, key: str, give_up_s: float = 240) -> None:
        started = time.monotonic()
        url = f"/api/v1/runs/{followed.run_id}/events/"
        while not followed.finished and time.monotonic() - started < give_up_s:
            headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
            if followed.seqs:
                headers["Last-Event-ID"] = str(followed.seqs[-1])
            try:
                with (
                    httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(10, read=20)) as c,
                    c.stream("GET", url, headers=headers) as response,
                ):
                    if response.status_code != 200:
                        raise httpx.HTTPStatusError(
                            f"HTTP {response.status_code}",
                            request=response.request,
                            response=response,
                        )
                    self._read(followed, response)
            except httpx.HTTPError as exc:
                followed.error = type(exc).__name__
            if not followed.finished:
                followed.reconnects += 1
                time.sleep(0.5)

    def _read(self, followed: Followed, response: httpx.Response) -> None:
        seq: int | None = None
        kind = ""
        for line in response.iter_lines():
            if line.startswith("id:"):
                seq = int(line[3:].strip())
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line == "":
                if seq is not None:
                    followed.seqs.append(seq)
                    followed.types.append(kind)
                    if kind in ("run.succeeded", "run.failed", "run.cancelled"):
                        followed.finished = True
                seq, kind = None, ""
