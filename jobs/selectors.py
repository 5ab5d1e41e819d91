"""Reads of the jobs app. Every function that serves a tenant takes the tenant and scopes by
it: this is the one door to tenant data (docs/security.md); callers never query by bare id."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet

from jobs.formats import parse_uuid
from jobs.models import Event, Run, RunStatus, StepRun, StepStatus, Workflow, WorkflowVersion
from tenants.models import Tenant


def workflow_for(*, tenant: Tenant, name: str) -> Workflow | None:
    return Workflow.objects.filter(tenant=tenant, name=name).first()


def workflow_version_for(
    *, tenant: Tenant, name: str, version: int | None = None
) -> WorkflowVersion | None:
    """The given version of the tenant's workflow `name`, or its latest."""
    versions = WorkflowVersion.objects.select_related("workflow").filter(
        workflow__tenant=tenant, workflow__name=name
    )
    if version is not None:
        return versions.filter(version=version).first()
    return versions.order_by("-version").first()


# The per-process cache of resolved versions, by (tenant public id, name, version or None for
# the latest). A version is immutable; a cached "latest" may have been superseded, which the
# submission's statement checks (`SubmissionChecks.cached_version`), and the caller drops it
# (`workflow_version_forget`) and resolves again.
_VERSIONS: dict[tuple[uuid.UUID, str, int | None], WorkflowVersion] = {}
_VERSIONS_MAX = 10_000


def workflow_version_cached(
    *, tenant: Tenant, name: str, version: int | None = None
) -> WorkflowVersion | None:
    """`workflow_version_for`, from this process's cache when it has the answer."""
    key = (tenant.public_id, name, version)
    found = _VERSIONS.get(key)
    if found is None:
        found = workflow_version_for(tenant=tenant, name=name, version=version)
        if found is not None:
            if len(_VERSIONS) >= _VERSIONS_MAX:
                _VERSIONS.clear()
            _VERSIONS[key] = found
    return found


def workflow_version_forget(*, tenant: Tenant, name: str, version: int | None = None) -> None:
    _VERSIONS.pop((tenant.public_id, name, version), None)


def workflows_for(*, tenant: Tenant) -> QuerySet[Workflow]:
    return Workflow.objects.filter(tenant=tenant).prefetch_related("versions").order_by("name")


def run_for(*, tenant: Tenant, run_id: str | uuid.UUID) -> Run | None:
    """The tenant's run with this public id; None for a malformed id or another tenant's."""
    public_id = parse_uuid(run_id)
    if public_id is None:
        return None
    return (
        Run.objects.select_related("workflow_version__workflow", "tenant")
        .filter(tenant=tenant, public_id=public_id)
        .first()
    )


def run_tenant_allows_origin(*, run_id: str | uuid.UUID, origin: str) -> bool:
    """Whether the tenant of run `run_id` lists `origin` among its allowed origins.

    The one read by bare run id: a browser's CORS preflight carries no credentials, so the
    run's tenant is the only one that can answer; it says yes or no and shows nothing else.
    """
    public_id = parse_uuid(run_id)
    if public_id is None or not origin:
        return False
    return Run.objects.filter(
        public_id=public_id, tenant__allowed_origins__contains=[origin]
    ).exists()


def runs_for(
    *,
    tenant: Tenant,
    status: str | None = None,
    workflow: str | None = None,
    lane: str | None = None,
) -> QuerySet[Run]:
    runs = Run.objects.select_related("workflow_version__workflow").filter(tenant=tenant)
    if status:
        runs = runs.filter(status=status)
    if workflow:
        runs = runs.filter(workflow_version__workflow__name=workflow)
    if lane:
        runs = runs.filter(lane=lane)
    return runs


def run_with_steps(run: Run) -> Run:
    """`run` with its steps, their attempts and its webhook deliveries prefetched."""
    return (
        Run.objects.select_related("workflow_version__workflow")
        .prefetch_related("steps__attempts", "webhook_deliveries__attempt_log")
        .get(pk=run.pk)
    )


def events_for(*, run: Run, after: int = 0, limit: int = 1000) -> list[Event]:
    return list(Event.objects.filter(run=run, seq__gt=after).order_by("seq")[:limit])


def run_by_idempotency_key(*, tenant: Tenant, key: str) -> Run | None:
    return (
        Run.objects.select_related("workflow_version__workflow")
        .filter(tenant=tenant, idempotency_key=key)
        .first()
    )


def queued_runs_count(*, tenant: Tenant, cap: int) -> int:
    """The tenant's runs not yet started (status `accepted`), counted up to `cap`."""
    return Run.objects.filter(tenant=tenant, status=RunStatus.ACCEPTED)[:cap].count()


def platform_backlog_count(*, cap: int) -> int:
    """Steps of active tenants waiting for a worker (`ready` or `queued`), up to `cap`.

    Paused tenants' steps are left out: a paused backlog must not refuse everyone else.
    """
    return StepRun.objects.filter(
        status__in=[StepStatus.READY, StepStatus.QUEUED], tenant__is_active=True
    )[:cap].count()


# --- steps in flight ------------------------------------------------------------------------
#
# The one definition of what occupies a worker. A step is in flight, and counts against its
# tenant's `max_concurrent_steps` and its queue's pool capacity, while it is `queued` (admitted:
# its message is in the broker or prefetched by a worker) or `running` on a worker. A step that
# waits without a worker is not: a map's own row (`running` while its items exist: it never
# runs on a worker, its items do), a `workflow` step waiting for its child run and an approval
# waiting for people (both `waiting`), a step waiting for its retry time (`retry_wait`).
# Counting those would let waiting parents fill a quota that their own children need: a
# tenant's map runs would then deadlock at any quota (docs/scheduling.md).
#
# Admission, the dashboard, the metrics and the admin all count with these two forms of it.

IN_FLIGHT_STATUSES = (StepStatus.QUEUED, StepStatus.RUNNING)


def in_flight_sql(alias: str = "") -> str:
    """The same predicate as SQL over `jobs_steprun` (as `alias`, if given), for the
    hand-written queries of admission and the metrics."""
    column = f"{alias}." if alias else ""
    return f"({column}status IN ('queued', 'running') AND {column}kind <> 'map')"


def in_flight_steps() -> QuerySet[StepRun]:
    """Steps that occupy a worker now (see above)."""
    return StepRun.objects.filter(status__in=IN_FLIGHT_STATUSES).exclude(kind="map")
