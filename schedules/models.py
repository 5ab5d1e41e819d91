"""Schedules, their fires, and the events that trigger workflows (docs/schedules.md).

A `ScheduleFire` is one fire time of one schedule: unique per (schedule, fire time), written in
the same transaction as the run it submits, so a fire time has at most one run. All writes go
through `schedules.services` and `schedules.triggers`.
"""

import uuid

from django.db import models
from django.db.models import Q

from jobs.models import Run, Workflow
from tenants.models import ApiKey, Tenant


class Overlap(models.TextChoices):
    """What a fire does while a run of an earlier fire of the same schedule is still active."""

    SKIP = "skip"
    BUFFER_ONE = "buffer_one"
    ALLOW_ALL = "allow_all"
    CANCEL_PREVIOUS = "cancel_previous"


class Schedule(models.Model):
    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="schedules")
    name = models.CharField(max_length=100)
    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="schedules")
    # None: the workflow's latest version at each fire.
    version = models.PositiveIntegerField(null=True, blank=True)
    # Rendered at each fire with `fire` and `schedule` (jobs.templating).
    input = models.JSONField(default=dict, blank=True)
    # Blank: the tenant's default lane.
    lane = models.CharField(max_length=16, blank=True)
    # Exactly one of `cron` (in `timezone`) and `interval_s` (from `starts_at`).
    cron = models.CharField(max_length=200, blank=True)
    timezone = models.CharField(max_length=64, default="UTC")
    interval_s = models.PositiveIntegerField(null=True, blank=True)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField(null=True, blank=True)
    overlap = models.CharField(max_length=16, choices=Overlap.choices, default=Overlap.SKIP)
    catchup_window_s = models.PositiveIntegerField(default=3600)
    jitter_s = models.PositiveIntegerField(default=0)
    paused = models.BooleanField(default=False)
    # The next fire time not yet recorded, and when it is due (plus its jitter); None: ended.
    next_fire_at = models.DateTimeField(null=True, blank=True)
    next_due_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant", "name"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="schedule_unique_name"),
            models.CheckConstraint(
                condition=(Q(cron="") & Q(interval_s__gt=0))
                | (~Q(cron="") & Q(interval_s__isnull=True)),
                name="schedule_cron_or_interval",
            ),
        ]
        indexes = [
            models.Index(fields=["next_due_at"], condition=Q(paused=False), name="schedule_due"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name}"


class FireKind(models.TextChoices):
    SCHEDULED = "scheduled"
    MANUAL = "manual"  # trigger now
    BACKFILL = "backfill"


class FireStatus(models.TextChoices):
    PENDING = "pending"  # due, not submitted yet: waiting for its turn, a quota or a run to end
    SUBMITTED = "submitted"  # its run exists
    SKIPPED = "skipped"  # by policy; `code` says which
    FAILED = "failed"  # could not become a run (its input, its workflow); `code` says why


class ScheduleFire(models.Model):
    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    schedule = models.ForeignKey(Schedule, on_delete=models.CASCADE, related_name="fires")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="schedule_fires")
    fire_at = models.DateTimeField()
    # fire_at plus the schedule's jitter: when it may be submitted.
    due_at = models.DateTimeField()
    kind = models.CharField(max_length=16, choices=FireKind.choices)
    status = models.CharField(max_length=16, choices=FireStatus.choices)
    code = models.CharField(max_length=64, blank=True)
    reason = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    retry_at = models.DateTimeField(null=True, blank=True)
    run = models.ForeignKey(
        Run, null=True, blank=True, on_delete=models.SET_NULL, related_name="schedule_fires"
    )
    submitted_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["schedule", "-fire_at"]
        constraints = [
            models.UniqueConstraint(fields=["schedule", "fire_at"], name="fire_unique_time")
        ]
        indexes = [
            models.Index(
                fields=["retry_at"], condition=Q(status="pending"), name="fire_pending_due"
            ),
            models.Index(fields=["schedule", "-fire_at"], name="fire_schedule_recent"),
        ]

    def __str__(self) -> str:
        return f"{self.schedule} @ {self.fire_at.isoformat()}"

    @property
    def lateness_s(self) -> float | None:
        """How long after its due time the fire's run was submitted."""
        if self.submitted_at is None:
            return None
        return max(0.0, (self.submitted_at - self.due_at).total_seconds())


class TriggerEvent(models.Model):
    """An event a tenant sent (`POST /api/v1/events/`) and the runs it started."""

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="trigger_events")
    name = models.CharField(max_length=200)
    # The sender's id (or a generated one): one event per id within the idempotency window.
    event_id = models.CharField(max_length=255)
    data = models.JSONField(default=dict, blank=True)
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    runs = models.ManyToManyField(Run, blank=True, related_name="trigger_events")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["tenant", "-created_at", "-id"], name="event_tenant_recent"),
            models.Index(fields=["tenant", "event_id", "-created_at"], name="event_tenant_id"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant.slug}/{self.name} {self.event_id}"
