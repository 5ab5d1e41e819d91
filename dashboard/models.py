"""What the operators' dashboard keeps besides the engine's own tables.

- `ProcessHeartbeat`: one row per Celery worker (and per scheduler), refreshed every few
  seconds by the process itself (`dashboard.heartbeats`); a row that stops being refreshed
  means the process is down.
- `MetricSample`: the bounded time series behind the overview's charts (`dashboard.sampling`),
  one row per (time, metric, key), kept for `SWITCHYARD_METRICS_RETENTION_H` hours.
- `MetricCounter`: cumulative counters and histogram buckets for `/metrics`, advanced by the
  sampler from the attempts and steps that finished since its watermark (`SamplerState`).
- `OperatorAction`: the audit trail of what operators did from the dashboard, and who.

Written only by `dashboard.heartbeats`, `dashboard.sampling` and `dashboard.services`.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class ProcessRole(models.TextChoices):
    WORKER = "worker"
    SCHEDULER = "scheduler"


class ProcessHeartbeat(models.Model):
    """A worker or scheduler process as it last reported itself."""

    role = models.CharField(max_length=16, choices=ProcessRole.choices)
    # A worker's Celery node name (`llm@host`); a scheduler's `scheduler@host/pid`.
    name = models.CharField(max_length=200, unique=True)
    hostname = models.CharField(max_length=200, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    queues = models.JSONField(default=list, blank=True)
    pool = models.CharField(max_length=32, blank=True)
    concurrency = models.PositiveIntegerField(null=True, blank=True)
    started_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()
    # Set by a clean shutdown; a killed process only stops refreshing `last_seen_at`.
    stopped_at = models.DateTimeField(null=True, blank=True)
    # Workers: attempts that finished on this node since it started (counted by its heartbeat).
    steps_succeeded = models.PositiveBigIntegerField(default=0)
    steps_failed = models.PositiveBigIntegerField(default=0)
    counted_until = models.DateTimeField(null=True, blank=True)
    # Schedulers: the last cycle.
    last_cycle_at = models.DateTimeField(null=True, blank=True)
    last_cycle_ms = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["role", "name"]

    def __str__(self) -> str:
        return f"{self.role} {self.name}"


class MetricSample(models.Model):
    """One point of one series: `metric` (e.g. `queue_depth`) for `key` (e.g. `steps.llm`)."""

    at = models.DateTimeField()
    metric = models.CharField(max_length=32)
    key = models.CharField(max_length=100, blank=True)
    value = models.FloatField()
    # A minute's average of the raw points, written by the housekeeping's roll-up
    # (`maintenance.housekeeping.metric_samples_roll_up`) once the points are old.
    rolled_up = models.BooleanField(default=False)

    class Meta:
        ordering = ["at", "id"]
        indexes = [
            models.Index(fields=["at"], name="metric_sample_at"),
            models.Index(fields=["metric", "at"], name="metric_sample_series"),
        ]

    def __str__(self) -> str:
        return f"{self.at:%H:%M:%S} {self.metric}[{self.key}]={self.value}"


class MetricCounter(models.Model):
    """A cumulative counter (or one histogram bucket) for Prometheus; only ever grows."""

    name = models.CharField(max_length=64)
    # The label set, canonical JSON (sorted keys), so that one label set is one row.
    labels = models.CharField(max_length=300)
    value = models.FloatField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["name", "labels"], name="metric_counter_unique")
        ]

    def __str__(self) -> str:
        return f"{self.name}{self.labels}={self.value}"


class SamplerState(models.Model):
    """The sampler's single row: when it last sampled, and up to when it has counted."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    last_sample_at = models.DateTimeField(null=True, blank=True)
    counted_until = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"sampled {self.last_sample_at}"


class OperatorAction(models.Model):
    """One action an operator took from the dashboard (the runs' own logs name them too)."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    operator = models.CharField(max_length=200)
    action = models.CharField(max_length=32)
    target = models.CharField(max_length=300)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.operator} {self.action} {self.target}"
