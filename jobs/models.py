"""Workflows, their immutable versions, runs, step runs, attempts, the event log, documents.

PostgreSQL is the source of truth (docs/architecture.md, invariant 1): the broker only ever
carries a step run's id and its dispatch token. All writes go through `jobs.services`.
"""

import uuid
from enum import StrEnum

from django.contrib.postgres.indexes import GinIndex, OpClass
from django.contrib.postgres.search import SearchVectorField
from django.db import models
from django.db.models import Q
from django.db.models.functions import Upper

from jobs import statuses
from tenants.models import Lane, Tenant


def _choices(vocabulary: type[StrEnum]) -> type[models.TextChoices]:
    """The model field's choices for one of `jobs.statuses`' enums: same names and values."""
    return models.TextChoices(vocabulary.__name__, [(m.name, m.value) for m in vocabulary])


RunStatus = _choices(statuses.RunStatus)
StepStatus = _choices(statuses.StepStatus)
AttemptOutcome = _choices(statuses.AttemptOutcome)


class Workflow(models.Model):
    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="workflows")
    name = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="workflow_unique_name")
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name}"


class WorkflowVersion(models.Model):
    """A validated definition (docs/workflows.md). Never updated: a change is a new version."""

    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="versions")
    version = models.PositiveIntegerField()
    definition = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["workflow", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["workflow", "version"], name="version_unique_number")
        ]

    def __str__(self) -> str:
        return f"{self.workflow} v{self.version}"


class Run(models.Model):
    # No single-column index where a composite one of Meta.indexes starts with the column: a
    # run's row changes several times per step, and each index is one more write per change.
    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    tenant = models.ForeignKey(
        Tenant, on_delete=models.CASCADE, related_name="runs", db_index=False
    )
    workflow_version = models.ForeignKey(
        WorkflowVersion, on_delete=models.PROTECT, related_name="runs", db_index=False
    )
    input = models.JSONField(default=dict)
    lane = models.CharField(max_length=16, choices=Lane.choices, default=Lane.STANDARD)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default="accepted")
    output = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    idempotency_key = models.CharField(max_length=255, blank=True)
    request_hash = models.CharField(max_length=64, blank=True)
    webhook_url = models.URLField(max_length=2000, blank=True)
    parent_step = models.OneToOneField(
        "StepRun",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="child_run",
    )
    # The next event's sequence number; incremented under the run's row lock so that
    # sequence numbers are gapless per run (docs/architecture.md, invariant 3).
    next_seq = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["tenant", "-created_at", "-id"], name="run_tenant_recent"),
            models.Index(fields=["tenant", "status"], name="run_tenant_status"),
            # The operators' runs list (dashboard): keyset pages, newest first, per filter.
            models.Index(fields=["-created_at", "-id"], name="run_recent"),
            models.Index(fields=["status", "-created_at", "-id"], name="run_status_recent"),
            models.Index(
                fields=["workflow_version", "-created_at", "-id"], name="run_version_recent"
            ),
            models.Index(fields=["lane", "-created_at", "-id"], name="run_lane_recent"),
            models.Index(
                fields=["tenant", "status"],
                condition=Q(status__in=["accepted", "running", "waiting"]),
                name="run_active",
            ),
            # `error__icontains` is UPPER(error) LIKE UPPER(%s): a trigram index on UPPER(error).
            GinIndex(OpClass(Upper("error"), name="gin_trgm_ops"), name="run_error_trgm"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="run_unique_idempotency_key",
            )
        ]

    def __str__(self) -> str:
        return str(self.public_id)

    @property
    def is_final(self) -> bool:
        return self.status in statuses.RUN_FINAL


class StepRun(models.Model):
    """One step of one run (or one item of a map step). Its `output` is the checkpoint."""

    # Indexed by `steprun_unique_key` (run, step_id, map_index).
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="steps", db_index=False)
    step_id = models.CharField(max_length=64)
    map_index = models.IntegerField(null=True, blank=True)
    kind = models.CharField(max_length=32)
    queue = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=StepStatus.choices, default="pending")
    # Denormalised from the run so that the scheduler's admission query needs no join.
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="step_runs")
    lane = models.CharField(max_length=16, choices=Lane.choices, default=Lane.STANDARD)
    attempt = models.PositiveIntegerField(default=0, help_text="Attempts started so far.")
    max_attempts = models.PositiveIntegerField(default=3)
    timeout_s = models.FloatField(default=300)
    input = models.JSONField(null=True, blank=True)
    output = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    dispatch_token = models.UUIDField(null=True, blank=True)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    retry_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    # Why a ready step is being held back (a quota), so that the run's log says it once.
    held_reason = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run_id", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["run", "step_id", "map_index"],
                name="steprun_unique_key",
                nulls_distinct=False,
            )
        ]
        indexes = [
            # The scheduler's scans: each is a partial index over the few rows in that state.
            models.Index(
                fields=["queue", "ready_at"],
                condition=Q(status="ready"),
                name="steprun_ready",
            ),
            # Admission's per-(queue, tenant, lane) scans: distinct buckets by a skip scan,
            # then capped counts and the oldest steps of each, whatever the backlog's size.
            models.Index(
                fields=["queue", "tenant", "lane", "ready_at", "id"],
                condition=Q(status="ready"),
                name="steprun_ready_bucket",
            ),
            models.Index(
                fields=["retry_at"], condition=Q(status="retry_wait"), name="steprun_retry_due"
            ),
            models.Index(
                fields=["lease_expires_at"],
                condition=Q(status="running"),
                name="steprun_lease",
            ),
            models.Index(
                fields=["dispatched_at"], condition=Q(status="queued"), name="steprun_queued"
            ),
            # Queue-wait metrics: the steps that started in a window.
            models.Index(fields=["started_at"], name="steprun_started"),
        ]

    def __str__(self) -> str:
        return f"{self.run_id}:{self.key}"

    @property
    def key(self) -> str:
        return self.step_id if self.map_index is None else f"{self.step_id}[{self.map_index}]"


class StepAttempt(models.Model):
    # Indexed by `attempt_unique_number` (step_run, number).
    step_run = models.ForeignKey(
        StepRun, on_delete=models.CASCADE, related_name="attempts", db_index=False
    )
    number = models.PositiveIntegerField()
    outcome = models.CharField(max_length=16, choices=AttemptOutcome.choices, default="running")
    dispatch_token = models.UUIDField()
    worker = models.CharField(max_length=200, blank=True)
    error = models.TextField(blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["step_run_id", "number"]
        constraints = [
            models.UniqueConstraint(fields=["step_run", "number"], name="attempt_unique_number")
        ]
        # Throughput, latency and per-worker counts: the attempts that finished in a window.
        indexes = [models.Index(fields=["finished_at"], name="attempt_finished")]

    def __str__(self) -> str:
        return f"{self.step_run} #{self.number}"


class Event(models.Model):
    """The append-only run log. `seq` is gapless and increasing per run."""

    # Indexed by `event_unique_seq` (run, seq).
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events", db_index=False)
    seq = models.PositiveIntegerField()
    type = models.CharField(max_length=64)
    step_id = models.CharField(max_length=64, blank=True)
    map_index = models.IntegerField(null=True, blank=True)
    data = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["run_id", "seq"]
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="event_unique_seq")]

    def __str__(self) -> str:
        return f"{self.run_id}#{self.seq} {self.type}"


class Document(models.Model):
    """A tenant's retrievable text, searched by `retrieval` steps (PostgreSQL full text)."""

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="documents")
    title = models.CharField(max_length=300, blank=True)
    text = models.TextField()
    metadata = models.JSONField(default=dict, blank=True)
    search = SearchVectorField(null=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [GinIndex(fields=["search"], name="document_search")]

    def __str__(self) -> str:
        return self.title or str(self.public_id)


class WebhookStatus(models.TextChoices):
    PENDING = "pending"  # no attempt has finished yet
    SUCCEEDED = "succeeded"  # a 2xx answer
    FAILED = "failed"  # the last attempt failed; another is due at next_attempt_at
    GAVE_UP = "gave_up"  # failed until the retry window closed, or refused by policy


WEBHOOK_OPEN = (WebhookStatus.PENDING, WebhookStatus.FAILED)


class WebhookDelivery(models.Model):
    """One event (a run ended) to POST to a run's `webhook_url`, retried until it lands.

    Retry delays live here (`next_attempt_at`), never in the broker: the scheduler's sweep
    publishes due deliveries with a fresh `dispatch_token`; a worker's claim and its report
    are compare-and-sets on that token (`jobs.services.webhooks`). `payload` is the exact body
    sent on every attempt, so retries are byte-identical and receivers can dedupe by event id.
    """

    event_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="webhook_deliveries")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="webhook_deliveries")
    event_type = models.CharField(max_length=64)
    url = models.URLField(max_length=2000)
    payload = models.TextField()
    status = models.CharField(
        max_length=16, choices=WebhookStatus.choices, default=WebhookStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    dispatch_token = models.UUIDField(null=True, blank=True)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    first_attempt_at = models.DateTimeField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "webhook deliveries"
        indexes = [
            # The sweep's scan: only open deliveries, by when they are due.
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status__in=["pending", "failed"]),
                name="webhook_due",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.event_id}"


class WebhookAttempt(models.Model):
    """One POST of a delivery: what the receiver answered (or why it could not)."""

    delivery = models.ForeignKey(
        WebhookDelivery, on_delete=models.CASCADE, related_name="attempt_log"
    )
    number = models.PositiveIntegerField()
    status_code = models.PositiveIntegerField(null=True, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    worker = models.CharField(max_length=200, blank=True)
    at = models.DateTimeField()

    class Meta:
        ordering = ["delivery", "number"]
        constraints = [
            models.UniqueConstraint(fields=["delivery", "number"], name="webhook_attempt_number")
        ]

    def __str__(self) -> str:
        return f"{self.delivery} #{self.number}"
