"""Liveness: every accepted run reaches a final state, at any quota of 1 or more.

Hypothesis draws a platform and a workload, submits every run at once, and plays the real
scheduler cycle, direct admission (on, as in production) and step transitions against
PostgreSQL, with simulated workers, broker, reviewers and passing of time
(tests/support/simulation.py).

What is drawn:
- the platform: each step queue's pool capacity (SWITCHYARD_POOL_CAPACITY, 1-3 slots),
  SWITCHYARD_QUEUE_DEPTH_FACTOR (0, 0.5, 1 or 2) and SWITCHYARD_QUEUE_MAX_QUEUED (1-4);
- 2-3 tenants, each with `max_concurrent_steps` and `max_active_runs` of 1-3 (1 drawn
  twice as often), `steps_per_minute` of 1, 6, 60, 600 or 6000 and a weight of 1-3;
- per tenant, up to two child workflows (the second may call the first) and one or two
  top-level workflows: chains and parallel steps (`after`), `when` conditions, optional
  steps, maps of 0-3 items, `workflow` steps (child runs, also as a map's items, with maps
  inside the child), `approval` steps (approved, rejected or, with a deadline, left to
  expire), llm steps and tool steps whose first attempts fail, retryably or not
  (`test.fails_attempts`);
- runs of those workflows, mostly in the tenant's default lane, all submitted before the
  first tick: 1-5 per tenant of workflows of up to 3 steps (up to 40 attempts in all,
  counting map items and child runs' steps; 20 examples), and a backlog of 5-8 per tenant of
  workflows of up to 2 steps (up to 40 attempts; 10 examples).

Each tick lets enough time pass for every tenant's bucket to refill a token and every retry
to come due. The runs, children included, must all be final within a number of ticks
derived from the workload's attempts; a run is declared stuck as soon as nothing has changed
for STALL_TICKS ticks, and the failure prints the workload, every unfinished step with its
held reason, and what `admission.decide()` would do now. At every instant observed (after
the scheduler's cycle and after each claim, report and decision), no tenant has more steps
occupying a worker than its `max_concurrent_steps`, and no queue more admitted steps
waiting for a worker than its depth bound.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from jobs import admission
from jobs.models import Run
from jobs.services.submission import run_submit
from jobs.services.workflows import workflow_version_create
from jobs.statuses import RUN_FINAL
from tenants.models import Tenant
from tenants.services import tenant_create
from tests.support.simulation import (
    Simulation,
    diagnosis,
    occupancy,
    progress_fingerprint,
    reset_database,
)

pytestmark = pytest.mark.django_db(transaction=True)

STEP_QUEUES = ("steps.tool", "steps.llm", "steps.control")
RATES = (1, 6, 60, 600, 6000)  # steps per minute; below 12 a tenant's bucket holds one token
MAX_ITEMS = 3
MAX_HOLD_TICKS = 2
MAX_DECISION_TICKS = 2
# Nothing changes for this many ticks only when the platform is stuck: a step holds its slot
# at most MAX_HOLD_TICKS, a decision waits at most MAX_DECISION_TICKS, and a tick refills
# every bucket by a token and passes every retry delay.
STALL_TICKS = MAX_HOLD_TICKS + MAX_DECISION_TICKS + 4

# Quotas of 1 are where liveness breaks first: drawn twice as often.
QUOTAS = (1, 1, 2, 3)
# Most runs use their tenant's default lane, so that they compete in one bucket.
LANES = ("standard", "standard", "standard", "interactive", "batch")

# No shrinking: an example that fails is stuck for STALL_TICKS ticks, which makes each
# shrinking step slow (minutes in all); the failure prints the workload and what holds it.
SETTINGS = settings(
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


# --- workloads ---------------------------------------------------------------------------------


@st.composite
def worker_steps(draw, *, children: list[str]) -> dict[str, Any]:
    """The kind-specific part of a step that a worker or a person settles."""
    kinds = ["tool", "tool", "llm", "approval"] + (["workflow", "workflow"] if children else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "tool":
        return {
            "kind": "tool",
            "tool": "test.fails_attempts",
            "args": {
                "failures": draw(st.integers(0, 3)),
                "retryable": draw(st.sampled_from([True, True, True, False])),
            },
            "retry": {"max_attempts": draw(st.integers(1, 3)), "backoff_s": 1, "max_backoff_s": 1},
        }
    if kind == "llm":
        return {
            "kind": "llm",
            "provider": "simulated",
            "prompt": "summarise the ticket",
            "simulated": {"latency_ms": 0},
        }
    if kind == "approval":
        step: dict[str, Any] = {
            "kind": "approval",
            "prompt": "May this go on?",
            "on_reject": draw(st.sampled_from(["fail", "continue"])),
        }
        if draw(st.booleans()):
            step["timeout_s"] = 1  # a deadline: the reviewer may let it expire
            step["on_timeout"] = draw(st.sampled_from(["approve", "reject", "fail"]))
        return step
    return {"kind": "workflow", "workflow": draw(st.sampled_from(children))}


@st.composite
def workflow_documents(
    draw, name: str, *, children: list[str], map_children: list[str], max_steps: int
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    for index in range(draw(st.integers(1, max_steps))):
        earlier = [step["id"] for step in steps]
        step: dict[str, Any]
        if draw(st.integers(0, 2)) == 0:
            items = list(range(draw(st.integers(0, MAX_ITEMS))))
            step = {
                "kind": "map",
                "over": f"{{{{ {items} }}}}",
                "step": draw(worker_steps(children=map_children)),
                "max_parallel": draw(st.integers(1, 3)),
            }
        else:
            step = draw(worker_steps(children=children))
        step = {"id": f"s{index}", **step}
        if earlier:
            after = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=2))
            if after:
                step["after"] = after
        conditions = [None, None, "true", "false"]
        if earlier:
            conditions.append(f"steps.{earlier[-1]}.status == 'succeeded'")
        when = draw(st.sampled_from(conditions))
        if when is not None:
            step["when"] = when
        if draw(st.booleans()):
            step["optional"] = True
        steps.append(step)
    return {"name": name, "steps": steps}


@dataclass(frozen=True)
class TenantPlan:
    slug: str
    max_concurrent_steps: int
    max_active_runs: int
    steps_per_minute: int
    weight: int
    # Uploaded in order: a document may call the ones before it.
    workflows: tuple[dict[str, Any], ...]
    runs: tuple[tuple[str, str], ...]  # (workflow name, lane)


@dataclass(frozen=True)
class Workload:
    pool_capacity: dict[str, int]
    depth_factor: float
    max_queued: int
    tenants: tuple[TenantPlan, ...]
    seed: int

    def platform_settings(self) -> dict[str, Any]:
        return {
            "SWITCHYARD_POOL_CAPACITY": self.pool_capacity,
            "SWITCHYARD_QUEUE_DEPTH_FACTOR": self.depth_factor,
            "SWITCHYARD_QUEUE_MAX_QUEUED": self.max_queued,
        }

    def tick_s(self) -> float:
        """A tick refills a token of the slowest tenant's bucket (with a margin for rounding)
        and passes any retry delay (at most 1 s here)."""
        slowest = min(plan.steps_per_minute for plan in self.tenants)
        return max(1.0, 60.0 / slowest) * 1.01


def work(document: dict[str, Any], documents: dict[str, dict[str, Any]]) -> int:
    """Attempts a run of `document` may make at most (a tool step's retries; one for other
    steps, which do not fail here), counting map items and child runs."""

    def cost(step: dict[str, Any]) -> int:
        if step["kind"] == "map":
            items = json.loads(step["over"].removeprefix("{{").removesuffix("}}"))
            return len(items) * cost(step["step"])
        if step["kind"] == "workflow":
            return 1 + work(documents[step["workflow"]], documents)
        return step.get("retry", {}).get("max_attempts", 1)

    return sum(cost(step) for step in document["steps"])


@st.composite
def tenant_plans(draw, slug: str, *, runs: tuple[int, int], top_steps: int) -> TenantPlan:
    documents: list[dict[str, Any]] = []
    if draw(st.integers(0, 3)):
        documents.append(
            draw(workflow_documents("leaf", children=[], map_children=[], max_steps=2))
        )
        if draw(st.booleans()):
            documents.append(
                draw(workflow_documents("middle", children=["leaf"], map_children=[], max_steps=2))
            )
    children = [document["name"] for document in documents]
    tops = [
        draw(
            workflow_documents(
                f"top{index}",
                children=children,
                map_children=children[:1],  # a map of child runs calls the leaf
                max_steps=top_steps,
            )
        )
        for index in range(draw(st.integers(1, 2)))
    ]
    names = [top["name"] for top in tops]
    submitted = draw(
        st.lists(
            st.tuples(st.sampled_from(names), st.sampled_from(LANES)),
            min_size=runs[0],
            max_size=runs[1],
        )
    )
    return TenantPlan(
        slug=slug,
        max_concurrent_steps=draw(st.sampled_from(QUOTAS)),
        max_active_runs=draw(st.sampled_from(QUOTAS)),
        steps_per_minute=draw(st.sampled_from(RATES)),
        weight=draw(st.integers(1, 3)),
        workflows=(*documents, *tops),
        runs=tuple(submitted),
    )


@st.composite
def workloads(draw, *, runs: tuple[int, int], top_steps: int, max_work: int) -> Workload:
    """2-3 tenants, each submitting between `runs[0]` and `runs[1]` runs of top-level
    workflows of up to `top_steps` steps; runs are kept in the order drawn until the workload
    reaches `max_work` attempts (each tenant keeps its first run)."""
    count = draw(st.integers(2, 3))
    tenants = [
        draw(tenant_plans(f"tenant-{chr(ord('a') + i)}", runs=runs, top_steps=top_steps))
        for i in range(count)
    ]
    total = 0
    kept: list[TenantPlan] = []
    for plan in tenants:
        documents = {document["name"]: document for document in plan.workflows}
        kept_runs: list[tuple[str, str]] = []
        for name, lane in plan.runs:
            cost = work(documents[name], documents)
            if kept_runs and total + cost > max_work:
                continue
            kept_runs.append((name, lane))
            total += cost
        kept.append(TenantPlan(**{**plan.__dict__, "runs": tuple(kept_runs)}))
    return Workload(
        pool_capacity={queue: draw(st.integers(1, 3)) for queue in STEP_QUEUES},
        depth_factor=draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
        max_queued=draw(st.integers(1, 4)),
        tenants=tuple(kept),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# --- the property ------------------------------------------------------------------------------


def submit_all(workload: Workload) -> tuple[dict[int, Tenant], int]:
    """Create the tenants, upload their workflows and submit every run, as a client would.
    Returns the tenants and the attempts the runs may make at most."""
    tenants: dict[int, Tenant] = {}
    submitted: list[tuple[Tenant, Any, str]] = []
    budget = 0
    for plan in workload.tenants:
        tenant, _key = tenant_create(slug=plan.slug, weight=plan.weight)
        Tenant.objects.filter(pk=tenant.pk).update(
            max_concurrent_steps=plan.max_concurrent_steps,
            max_active_runs=plan.max_active_runs,
            steps_per_minute=plan.steps_per_minute,
        )
        tenant.refresh_from_db()
        tenants[tenant.pk] = tenant
        versions = {
            document["name"]: workflow_version_create(tenant=tenant, document=document)
            for document in plan.workflows
        }
        documents = {document["name"]: document for document in plan.workflows}
        for name, lane in plan.runs:
            submitted.append((tenant, versions[name], lane))
            budget += work(documents[name], documents)
    # Interleave the tenants' submissions, as concurrent clients would.
    random.Random(workload.seed).shuffle(submitted)
    for tenant, version, lane in submitted:
        run_submit(tenant=tenant, version=version, input={}, lane=lane)
    return tenants, budget


def describe(workload: Workload) -> str:
    """The workload as a reader needs it to reproduce a failure."""
    lines = [
        f"platform: SWITCHYARD_POOL_CAPACITY={workload.pool_capacity}, "
        f"SWITCHYARD_QUEUE_DEPTH_FACTOR={workload.depth_factor}, "
        f"SWITCHYARD_QUEUE_MAX_QUEUED={workload.max_queued}, tick {workload.tick_s():.2f} s, "
        f"seed {workload.seed}"
    ]
    for plan in workload.tenants:
        lines.append(
            f"{plan.slug}: max_concurrent_steps={plan.max_concurrent_steps}, "
            f"max_active_runs={plan.max_active_runs}, steps_per_minute={plan.steps_per_minute}, "
            f"weight={plan.weight}, runs {list(plan.runs)}"
        )
        lines.extend(f"    {json.dumps(document)}" for document in plan.workflows)
    return "\n".join(lines)


def assert_every_run_finishes(workload: Workload) -> None:
    """Play `workload` to its end; fail when it gets stuck, takes too long or breaks a quota."""
    reset_database()
    simulation = Simulation(
        capacity=workload.pool_capacity,
        tick_s=workload.tick_s(),
        rng=random.Random(workload.seed),
        max_hold_ticks=MAX_HOLD_TICKS,
        max_decision_ticks=MAX_DECISION_TICKS,
    )

    def failure(what: str) -> str:
        return f"{what}\n\nWorkload:\n{describe(workload)}\n\nNow:\n{diagnosis(simulation)}"

    with simulation.running(**workload.platform_settings()):
        tenants, budget = submit_all(workload)

        def quotas_hold(where: str) -> None:
            now = occupancy()
            for tenant_id, in_flight in now.in_flight.items():
                tenant = tenants[tenant_id]
                assert in_flight <= tenant.max_concurrent_steps, failure(
                    f"{tenant.slug} has {in_flight} steps occupying a worker, over its "
                    f"max_concurrent_steps of {tenant.max_concurrent_steps}, {where}"
                )
            for queue, queued in now.queued.items():
                bound = admission.max_queued(queue)
                assert queued <= bound, failure(
                    f"{queue} has {queued} admitted steps waiting for a worker, over its depth "
                    f"bound of {bound}, {where}"
                )

        simulation.observe = quotas_hold
        quotas_hold("after the submissions")

        # Each attempt needs at most a tick to be admitted, MAX_HOLD_TICKS on its worker and a
        # tick for its retry delay; an approval at most MAX_DECISION_TICKS more.
        max_ticks = budget * (MAX_HOLD_TICKS + MAX_DECISION_TICKS + 2) + 20
        before, unchanged = None, 0
        while True:
            now = progress_fingerprint()
            runs = now[0]
            if all(status in RUN_FINAL for _pk, status in runs):
                break
            unchanged = unchanged + 1 if now == before else 0
            before = now
            assert unchanged < STALL_TICKS, failure(
                f"stuck: nothing has changed for {STALL_TICKS} ticks and runs are unfinished"
            )
            assert simulation.tick_number < max_ticks, failure(
                f"runs are still unfinished after {max_ticks} ticks"
            )
            simulation.tick()

    # Every accepted run, and every child run they started, ended.
    assert set(Run.objects.values_list("status", flat=True)) <= set(RUN_FINAL)


@settings(SETTINGS, max_examples=20)
@given(workload=workloads(runs=(1, 5), top_steps=3, max_work=40))
def test_every_accepted_run_reaches_a_final_state_at_any_quota(transactional_db, workload):
    assert_every_run_finishes(workload)


@settings(SETTINGS, max_examples=10)
@given(workload=workloads(runs=(5, 8), top_steps=2, max_work=40))
def test_a_backlog_of_runs_drains_at_any_quota(transactional_db, workload):
    """Many runs per tenant, submitted at once: most wait for `max_active_runs` while the
    started ones need their next steps admitted ahead of them."""
    assert_every_run_finishes(workload)
