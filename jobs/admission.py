"""Which ready steps the scheduler admits to the broker next (the admission policy).

The broker is kept shallow: per queue, at most `SWITCHYARD_QUEUE_MAX_QUEUED` admitted steps
wait in RabbitMQ, so the backlog stays in PostgreSQL where it can be ordered. Within that
room, this policy orders by lane, then by how long a step has been ready. Paused tenants'
steps stay ready and are not admitted.
"""

from __future__ import annotations

from django.conf import settings
from django.db.models import Case, Count, IntegerField, Value, When

from jobs.models import StepRun, StepStatus
from jobs.steps import registry
from tenants.models import LANE_RANK


def queue_room() -> dict[str, int]:
    """Per queue, how many more steps may be admitted now."""
    queued = dict(
        StepRun.objects.filter(status=StepStatus.QUEUED)
        .values_list("queue")
        .annotate(n=Count("id"))
        .values_list("queue", "n")
    )
    limit = settings.SWITCHYARD_QUEUE_MAX_QUEUED
    queues = sorted({spec.queue for spec in registry.kinds().values()})
    return {queue: max(0, limit - queued.get(queue, 0)) for queue in queues}


def steps_to_admit() -> list[int]:
    """Ids of ready steps to admit this cycle, in admission order."""
    room = {queue: free for queue, free in queue_room().items() if free > 0}
    if not room:
        return []
    lane_rank = Case(
        *[When(lane=lane, then=Value(rank)) for lane, rank in LANE_RANK.items()],
        output_field=IntegerField(),
    )
    candidates = (
        StepRun.objects.filter(status=StepStatus.READY, queue__in=room, tenant__is_active=True)
        .annotate(lane_rank=lane_rank)
        .order_by("-lane_rank", "ready_at", "id")
        .values_list("id", "queue")[: min(sum(room.values()), settings.SWITCHYARD_SCHEDULER_BATCH)]
    )
    chosen: list[int] = []
    for step_run_id, queue in candidates:
        if room[queue] > 0:
            room[queue] -= 1
            chosen.append(step_run_id)
    return chosen
