"""The schedules and events API (docs/schedules.md).

`/api/v1/schedules/` (list, create), `/api/v1/schedules/{id}/` (read, change, delete), its
`pause/`, `resume/`, `trigger/` (fire now), `backfill/` and `fires/`; `/api/v1/events/` (send
an event, list the tenant's events). Views read through `schedules.selectors`, scoped to the
key's tenant, and write through `schedules.services` and `schedules.triggers`.
"""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from jobs.api import openapi
from jobs.api.errors import ApiError, not_found
from jobs.definitions import EVENT_NAME_PATTERN
from jobs.formats import iso
from jobs.models import RunStatus
from jobs.services.submission import Backpressure
from jobs.transitions.runs import RunError
from schedules import selectors
from schedules.models import FireKind, FireStatus, Overlap, Schedule, ScheduleFire, TriggerEvent
from schedules.services import (
    ScheduleError,
    schedule_backfill,
    schedule_create,
    schedule_delete,
    schedule_fire_now,
    schedule_pause,
    schedule_resume,
    schedule_update,
)
from schedules.triggers import MAX_EVENT_ID, event_receive
from tenants.models import ApiKey, Lane

SCHEDULE_ID = OpenApiParameter("schedule_id", OpenApiTypes.UUID, OpenApiParameter.PATH)
LIMIT = OpenApiParameter("limit", OpenApiTypes.INT, description="At most 200 (default 50).")


# --- shapes ----------------------------------------------------------------------------------


class ScheduleIn(serializers.Serializer):
    name = serializers.RegexField(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
    workflow = serializers.CharField(max_length=100, help_text="The workflow's name.")
    version = serializers.IntegerField(
        min_value=1,
        max_value=2**31 - 1,
        required=False,
        allow_null=True,
        help_text="Omitted or null: the latest.",
    )
    input = serializers.DictField(
        required=False, help_text="The run's input; templates read `fire` and `schedule`."
    )
    lane = serializers.ChoiceField(choices=Lane.choices, required=False, allow_blank=True)
    cron = serializers.CharField(
        max_length=200, required=False, allow_blank=True, help_text="Five fields, `L`, `#`."
    )
    timezone = serializers.CharField(max_length=64, required=False, help_text="IANA name.")
    interval_s = serializers.IntegerField(
        min_value=1, max_value=366 * 86400, required=False, allow_null=True
    )
    starts_at = serializers.DateTimeField(required=False)
    ends_at = serializers.DateTimeField(required=False, allow_null=True)
    overlap = serializers.ChoiceField(choices=Overlap.choices, required=False)
    catchup_window_s = serializers.IntegerField(min_value=0, max_value=31 * 86400, required=False)
    jitter_s = serializers.IntegerField(min_value=0, max_value=86400, required=False)
    paused = serializers.BooleanField(required=False)


class ScheduleChangeIn(ScheduleIn):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, partial=True, **kwargs)
        del self.fields["workflow"]


class BackfillIn(serializers.Serializer):
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()


class TriggerEventIn(serializers.Serializer):
    name = serializers.RegexField(EVENT_NAME_PATTERN)
    data = serializers.JSONField(required=False, default=dict)
    id = serializers.CharField(
        max_length=MAX_EVENT_ID,
        required=False,
        allow_blank=True,
        help_text="Your event id: the same id within 24 h starts nothing again.",
    )


class FireOut(serializers.Serializer):
    id = serializers.UUIDField()
    fire_at = serializers.DateTimeField()
    due_at = serializers.DateTimeField(help_text="fire_at plus the schedule's jitter.")
    kind = serializers.ChoiceField(choices=FireKind.choices)
    status = serializers.ChoiceField(choices=FireStatus.choices)
    code = serializers.CharField(allow_blank=True, help_text="Why skipped, refused or failed.")
    reason = serializers.CharField(allow_blank=True)
    attempts = serializers.IntegerField()
    retry_at = serializers.DateTimeField(allow_null=True)
    run = serializers.UUIDField(allow_null=True)
    run_status = serializers.ChoiceField(choices=RunStatus.choices, allow_null=True)
    submitted_at = serializers.DateTimeField(allow_null=True)
    lateness_s = serializers.FloatField(allow_null=True)


class FireListOut(serializers.Serializer):
    fires = FireOut(many=True)


class BackfillOut(serializers.Serializer):
    fires = FireOut(many=True, help_text="The fire times queued, oldest first.")


class ScheduleOut(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    workflow = serializers.CharField()
    version = serializers.IntegerField(allow_null=True)
    input = serializers.DictField()
    lane = serializers.CharField(allow_blank=True)
    cron = serializers.CharField(allow_blank=True)
    timezone = serializers.CharField()
    interval_s = serializers.IntegerField(allow_null=True)
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField(allow_null=True)
    overlap = serializers.ChoiceField(choices=Overlap.choices)
    catchup_window_s = serializers.IntegerField()
    jitter_s = serializers.IntegerField()
    paused = serializers.BooleanField()
    next_fire_at = serializers.DateTimeField(allow_null=True, help_text="Null: ended.")
    last_fire = FireOut(allow_null=True)
    created_at = serializers.DateTimeField()


class ScheduleListOut(serializers.Serializer):
    schedules = ScheduleOut(many=True)


class StartedRunOut(serializers.Serializer):
    id = serializers.UUIDField()
    workflow = serializers.CharField()
    status = serializers.ChoiceField(choices=RunStatus.choices)


class TriggerEventOut(serializers.Serializer):
    id = serializers.UUIDField()
    event_id = serializers.CharField()
    name = serializers.CharField()
    data = serializers.JSONField()
    sent_by = serializers.CharField(allow_null=True, help_text="The API key's name.")
    created_at = serializers.DateTimeField()
    runs = StartedRunOut(many=True)


class TriggerSkippedOut(serializers.Serializer):
    workflow = serializers.CharField()
    reason = serializers.CharField()


class TriggerEventReceivedOut(serializers.Serializer):
    event = TriggerEventOut()
    runs = StartedRunOut(many=True, help_text="The runs this event started.")
    skipped = TriggerSkippedOut(many=True, help_text="Subscribed workflows that did not start.")
    duplicate = serializers.BooleanField(help_text="This id was received before (24 h).")


class TriggerEventListOut(serializers.Serializer):
    events = TriggerEventOut(many=True)


# --- representations -------------------------------------------------------------------------


def fire_repr(fire: ScheduleFire) -> dict[str, Any]:
    run = fire.run
    return {
        "id": str(fire.public_id),
        "fire_at": iso(fire.fire_at),
        "due_at": iso(fire.due_at),
        "kind": fire.kind,
        "status": fire.status,
        "code": fire.code,
        "reason": fire.reason,
        "attempts": fire.attempts,
        "retry_at": iso(fire.retry_at),
        "run": str(run.public_id) if run else None,
        "run_status": run.status if run else None,
        "submitted_at": iso(fire.submitted_at),
        "lateness_s": fire.lateness_s,
    }


def schedule_repr(schedule: Schedule, last_fire: ScheduleFire | None) -> dict[str, Any]:
    return {
        "id": str(schedule.public_id),
        "name": schedule.name,
        "workflow": schedule.workflow.name,
        "version": schedule.version,
        "input": schedule.input,
        "lane": schedule.lane,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "interval_s": schedule.interval_s,
        "starts_at": iso(schedule.starts_at),
        "ends_at": iso(schedule.ends_at),
        "overlap": schedule.overlap,
        "catchup_window_s": schedule.catchup_window_s,
        "jitter_s": schedule.jitter_s,
        "paused": schedule.paused,
        "next_fire_at": iso(schedule.next_fire_at),
        "last_fire": fire_repr(last_fire) if last_fire else None,
        "created_at": iso(schedule.created_at),
    }


def _run_repr(run) -> dict[str, Any]:
    return {
        "id": str(run.public_id),
        "workflow": run.workflow_version.workflow.name,
        "status": run.status,
    }


def event_repr(event: TriggerEvent, runs=None) -> dict[str, Any]:
    runs = runs if runs is not None else getattr(event, "started_runs", None)
    if runs is None:
        runs = list(event.runs.all())
    return {
        "id": str(event.public_id),
        "event_id": event.event_id,
        "name": event.name,
        "data": event.data,
        "sent_by": event.api_key.name if event.api_key else None,
        "created_at": iso(event.created_at),
        "runs": [_run_repr(run) for run in runs],
    }


# --- views -----------------------------------------------------------------------------------


def _tenant(request: Request):
    return request.user.tenant


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 200:
        raise ApiError(
            status_code=400, code="invalid_request", message="limit must be from 1 to 200"
        )
    return int(raw)


def _schedule_error(exc: ScheduleError) -> ApiError:
    code = {"not_found": 404, "name_taken": 409}.get(exc.code, 400)
    details = [{"path": f.path, "message": f.message} for f in exc.faults] or None
    return ApiError(status_code=code, code=exc.code, message=exc.message, details=details)


def _backpressure(exc: Backpressure) -> ApiError:
    return ApiError(
        status_code=429 if exc.code == "queued_runs_quota_full" else 503,
        code=exc.code,
        message=exc.message,
        headers={"Retry-After": str(exc.retry_after)},
    )


def _schedule_or_404(request: Request, schedule_id: str) -> Schedule:
    schedule = selectors.schedule_for(tenant=_tenant(request), schedule_id=schedule_id)
    if schedule is None:
        raise not_found("schedule")
    return schedule


def _one(schedule: Schedule) -> dict[str, Any]:
    return schedule_repr(schedule, selectors.last_fires([schedule]).get(schedule.pk))


class ScheduleListView(APIView):
    @extend_schema(
        tags=["schedules"],
        operation_id="schedules_list",
        summary="The tenant's schedules, with each one's next fire time and last fire",
        responses={200: ScheduleListOut, **openapi.errors()},
    )
    def get(self, request: Request) -> Response:
        schedules = list(selectors.schedules_for(tenant=_tenant(request)))
        last = selectors.last_fires(schedules)
        return Response({"schedules": [schedule_repr(s, last.get(s.pk)) for s in schedules]})

    @extend_schema(
        tags=["schedules"],
        operation_id="schedules_create",
        summary="Create a schedule (a cron expression in a time zone, or an interval)",
        request=ScheduleIn,
        responses={201: ScheduleOut, **openapi.errors(400, 404, 409, 413)},
    )
    def post(self, request: Request) -> Response:
        body = ScheduleIn(data=request.data)
        body.is_valid(raise_exception=True)
        fields = dict(body.validated_data)
        try:
            schedule = schedule_create(
                tenant=_tenant(request),
                name=fields.pop("name"),
                workflow=fields.pop("workflow"),
                now=timezone.now(),
                **fields,
            )
        except ScheduleError as exc:
            raise _schedule_error(exc) from None
        return Response(
            schedule_repr(schedule, None),
            status=status.HTTP_201_CREATED,
            headers={
                "Location": reverse(
                    "schedules-api:schedule-detail", kwargs={"schedule_id": schedule.public_id}
                )
            },
        )


class ScheduleDetailView(APIView):
    @extend_schema(
        tags=["schedules"],
        operation_id="schedules_retrieve",
        summary="A schedule",
        parameters=[SCHEDULE_ID],
        responses={200: ScheduleOut, **openapi.errors(404)},
    )
    def get(self, request: Request, schedule_id: str) -> Response:
        return Response(_one(_schedule_or_404(request, schedule_id)))

    @extend_schema(
        tags=["schedules"],
        operation_id="schedules_partial_update",
        summary="Change a schedule (a change of its timing plans its next fire from now)",
        parameters=[SCHEDULE_ID],
        request=ScheduleChangeIn,
        responses={200: ScheduleOut, **openapi.errors(400, 404, 409, 413)},
    )
    def patch(self, request: Request, schedule_id: str) -> Response:
        schedule = _schedule_or_404(request, schedule_id)
        body = ScheduleChangeIn(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            schedule = schedule_update(schedule=schedule, now=timezone.now(), **body.validated_data)
        except ScheduleError as exc:
            raise _schedule_error(exc) from None
        return Response(_one(schedule))

    @extend_schema(
        tags=["schedules"],
        operation_id="schedules_destroy",
        summary="Delete a schedule and its fires (their runs stay)",
        parameters=[SCHEDULE_ID],
        responses={204: None, **openapi.errors(404)},
    )
    def delete(self, request: Request, schedule_id: str) -> Response:
        schedule_delete(schedule=_schedule_or_404(request, schedule_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class SchedulePauseView(APIView):
    @extend_schema(
        tags=["schedules"],
        operation_id="schedules_pause",
        summary="Pause: no fire time is recorded until resumed",
        parameters=[SCHEDULE_ID],
        request=None,
        responses={200: ScheduleOut, **openapi.errors(404)},
    )
    def post(self, request: Request, schedule_id: str) -> Response:
        schedule = schedule_pause(
            schedule=_schedule_or_404(request, schedule_id), now=timezone.now()
        )
        return Response(_one(schedule))


class ScheduleResumeView(APIView):
    @extend_schema(
        tags=["schedules"],
        operation_id="schedules_resume",
        summary="Resume from the first fire time after now (missed times need a backfill)",
        parameters=[SCHEDULE_ID],
        request=None,
        responses={200: ScheduleOut, **openapi.errors(404)},
    )
    def post(self, request: Request, schedule_id: str) -> Response:
        schedule = _schedule_or_404(request, schedule_id)
        schedule = schedule_resume(schedule=schedule, now=timezone.now())
        return Response(_one(schedule))


class ScheduleTriggerView(APIView):
    @extend_schema(
        tags=["schedules"],
        operation_id="schedules_trigger",
        summary="Fire now, by the schedule's overlap policy and the tenant's quotas",
        parameters=[SCHEDULE_ID],
        request=None,
        responses={202: FireOut, **openapi.errors(404)},
    )
    def post(self, request: Request, schedule_id: str) -> Response:
        schedule = _schedule_or_404(request, schedule_id)
        fire = schedule_fire_now(schedule=schedule, now=timezone.now())
        return Response(fire_repr(fire), status=status.HTTP_202_ACCEPTED)


class ScheduleBackfillView(APIView):
    @extend_schema(
        tags=["schedules"],
        operation_id="schedules_backfill",
        summary="Fire the schedule's past fire times in [start, end], oldest first",
        description=(
            "At most 1,000 fire times. A time that already has a run is not fired again; a "
            "skipped one is. The fires are submitted by the scheduler in order, as the "
            "tenant's quotas allow; the overlap policy does not apply to them."
        ),
        parameters=[SCHEDULE_ID],
        request=BackfillIn,
        responses={202: BackfillOut, **openapi.errors(400, 404, 413)},
    )
    def post(self, request: Request, schedule_id: str) -> Response:
        schedule = _schedule_or_404(request, schedule_id)
        body = BackfillIn(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            fires = schedule_backfill(schedule=schedule, now=timezone.now(), **body.validated_data)
        except ScheduleError as exc:
            raise _schedule_error(exc) from None
        return Response({"fires": [fire_repr(f) for f in fires]}, status=status.HTTP_202_ACCEPTED)


class ScheduleFiresView(APIView):
    @extend_schema(
        tags=["schedules"],
        operation_id="schedules_fires_list",
        summary="A schedule's fires, latest fire time first, each with its run or reason",
        parameters=[SCHEDULE_ID, LIMIT],
        responses={200: FireListOut, **openapi.errors(400, 404)},
    )
    def get(self, request: Request, schedule_id: str) -> Response:
        schedule = _schedule_or_404(request, schedule_id)
        fires = selectors.fires_for(schedule=schedule, limit=_limit(request))
        return Response({"fires": [fire_repr(f) for f in fires]})


class EventListView(APIView):
    @extend_schema(
        tags=["events"],
        operation_id="events_list",
        summary="The tenant's events, newest first: who sent what, which runs it started",
        parameters=[LIMIT],
        responses={200: TriggerEventListOut, **openapi.errors(400)},
    )
    def get(self, request: Request) -> Response:
        events = selectors.events_for(tenant=_tenant(request), limit=_limit(request))
        return Response({"events": [event_repr(event) for event in events]})

    @extend_schema(
        tags=["events"],
        operation_id="events_create",
        summary="Send an event: start every workflow subscribed to its name",
        description=(
            "Each workflow whose latest version has a trigger for `name` whose `when` holds "
            "gets one run. The same `id` within 24 h starts nothing again and answers with the "
            "first runs (`duplicate: true`). Under backpressure nothing is stored: retry with "
            "the same `id` after `Retry-After`."
        ),
        request=TriggerEventIn,
        responses={202: TriggerEventReceivedOut, **openapi.errors(400, 413, 429, 503)},
    )
    def post(self, request: Request) -> Response:
        body = TriggerEventIn(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            receipt = event_receive(
                tenant=_tenant(request),
                name=data["name"],
                data=data.get("data", {}),
                event_id=data.get("id", ""),
                api_key=request.auth if isinstance(request.auth, ApiKey) else None,
                now=timezone.now(),
            )
        except Backpressure as exc:
            raise _backpressure(exc) from None
        except RunError as exc:
            raise ApiError(status_code=400, code=exc.code, message=exc.message) from None
        runs = [_run_repr(run) for run in receipt.runs]
        return Response(
            {
                "event": event_repr(receipt.event, receipt.runs),
                "runs": runs,
                "skipped": [{"workflow": s.workflow, "reason": s.reason} for s in receipt.skipped],
                "duplicate": receipt.duplicate,
            },
            status=status.HTTP_202_ACCEPTED,
        )
