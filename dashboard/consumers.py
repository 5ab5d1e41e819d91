"""Live sockets of the operators' dashboard (staff only, Django session).

`WS /ws/dashboard/?view=overview|workers|tenants|schedules|events[&since=<epoch s>]` pushes the
page's live part: `{"type": "refresh", "view", "html", "figures", "samples"}`. `html` is the
page's fragment rendered from the database (for the Tenants page, the search, sort and page of
its `q`, `sort` and `page`), `figures` the same numbers as data (for scripts and tests),
`samples` the chart points taken since the last push (overview only). A push happens
at connect, within about a second after any run changes (the `dashboard.changed` ping that
`jobs.events` sends, throttled per process), and every `SWITCHYARD_DASHBOARD_REFRESH_S` in any
case (queue depths change without a run event, and the channel layer may drop a ping).

`WS /ws/dashboard/runs/<id>/?after=<seq>` streams one run's events after `seq` (the same feed
as the client API's stream, `jobs.feeds.RunFeed`), and closes after the run's final event.

Close codes: 4401 not signed in, 4403 not staff, 4404 no such run. The run socket is
`jobs.sockets.RunStreamConsumer` (the tenants' run socket's stream) with the staff check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.template.loader import render_to_string
from django.utils import timezone

from dashboard import health, overview_page, run_queries, sampling, tenant_usage
from jobs.events import DASHBOARD_GROUP
from jobs.feeds import db_call
from jobs.sockets import (
    CLOSE_NOT_FOUND,
    Authorised,
    RunStreamConsumer,
    query,
    seq_from,
    session_refusal,
)
from schedules.dashboard import events_frame, schedules_frame

log = logging.getLogger(__name__)
# At most one push per this interval, however many runs change.
MIN_GAP_S = 0.5
VIEWS = ("overview", "workers", "tenants", "schedules", "events")
CHART_WINDOW = timedelta(hours=1)


def overview_frame(chart_since: datetime) -> tuple[dict[str, Any], datetime]:
    now = timezone.now()
    context = overview_page.overview(now)
    samples = sampling.series(since=max(chart_since, now - CHART_WINDOW))
    if samples["t"]:
        chart_since = datetime.fromtimestamp(samples["t"][-1], UTC)
    totals = context["backlog_totals"]
    figures = {
        "queues": {q.name: {"depth": q.depth, "consumers": q.consumers} for q in context["queues"]},
        "backlog": {"ready": totals.ready, "queued": totals.queued, "running": totals.running},
        "backlog_by_tenant_lane": [
            {"tenant": r.tenant, "lane": r.lane, "ready": r.ready, "running": r.running}
            for r in context["backlog"]
        ],
        "active_runs": context["active_counts"],
        "finished_5m": context["finished_5m"],
        "failed_5m": context["failed_5m"],
        "workers_up": context["workers_up"],
        "workers_down": context["workers_down"],
        "health": {h.name: h.ok for h in context["health"]},
    }
    html = render_to_string("dashboard/_overview_live.html", context)
    return {"html": html, "figures": figures, "samples": samples}, chart_since


def workers_frame() -> dict[str, Any]:
    now = timezone.now()
    workers = health.workers(now)
    figures = {
        "workers": [
            {
                "name": w.name,
                "state": w.state,
                "current": len(w.current),
                "succeeded": w.succeeded,
                "failed": w.failed,
            }
            for w in workers
        ]
    }
    html = render_to_string(
        "dashboard/_workers_live.html",
        {"workers": workers, "now": now, "down_after": settings.SWITCHYARD_WORKER_DOWN_AFTER_S},
    )
    return {"html": html, "figures": figures}


def tenants_frame(query: tenant_usage.TenantQuery | None = None) -> dict[str, Any]:
    """The Tenants page's list as the page asked for it (its search, sort and page)."""
    listing = tenant_usage.tenants_usage(query)
    figures = {
        "tenants": {
            u.tenant.slug: {
                "active": u.tenant.is_active,
                **{bar.label: bar.used for bar in u.bars},
            }
            for u in listing.usage
        }
    }
    html = render_to_string(
        "dashboard/_tenants_live.html",
        {
            "listing": listing,
            "query": urlencode(listing.query.as_query()),
            "actions": tenant_usage.recent_actions(),
            "now": timezone.now(),
        },
    )
    return {"html": html, "figures": figures}


class DashboardConsumer(AsyncJsonWebsocketConsumer):
    view = "overview"
    pushing: asyncio.Task | None = None
    joined = False

    async def connect(self) -> None:
        await self.accept()
        refusal = session_refusal(self.scope, staff=True)
        if refusal is not None:
            await self.close(code=refusal)
            return
        params = query(self.scope)
        self.view = params.get("view") if params.get("view") in VIEWS else "overview"
        try:
            since = float(params.get("since", "0"))
        except ValueError:
            since = 0.0
        self.chart_since = datetime.fromtimestamp(max(since, 0.0), UTC)
        # The Tenants page sends its own search, sort and page along.
        self.tenant_query = tenant_usage.TenantQuery.from_query(params)
        self.poke = asyncio.Event()
        self.poke.set()
        await self.channel_layer.group_add(DASHBOARD_GROUP, self.channel_name)
        self.joined = True
        self.pushing = asyncio.create_task(self._push_forever())

    async def disconnect(self, code: int) -> None:
        if self.pushing is not None:
            self.pushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.pushing
        if self.joined:
            await self.channel_layer.group_discard(DASHBOARD_GROUP, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        self.poke.set()  # any message asks for a refresh now

    async def dashboard_changed(self, message: dict[str, Any]) -> None:
        self.poke.set()

    async def _push_forever(self) -> None:
        refresh = float(settings.SWITCHYARD_DASHBOARD_REFRESH_S)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(refresh):
                    await self.poke.wait()
            self.poke.clear()
            try:
                frame = await db_call(self._frame)()
            except Exception:
                log.warning("dashboard %s refresh failed", self.view, exc_info=True)
            else:
                await self.send_json({"type": "refresh", "view": self.view, **frame})
            await asyncio.sleep(MIN_GAP_S)

    def _frame(self) -> dict[str, Any]:
        if self.view == "workers":
            return workers_frame()
        if self.view == "tenants":
            return tenants_frame(self.tenant_query)
        if self.view == "schedules":
            return schedules_frame()
        if self.view == "events":
            return events_frame()
        frame, self.chart_since = overview_frame(self.chart_since)
        return frame


class OperatorRunConsumer(RunStreamConsumer):
    """`WS /ws/dashboard/runs/<id>/?after=<seq>`: any tenant's run, for staff; no deltas."""

    deltas = False

    async def authorise(self) -> Authorised:
        refusal = session_refusal(self.scope, staff=True)
        if refusal is not None:
            return refusal
        run_id = self.scope["url_route"]["kwargs"]["run_id"]
        run = await db_call(run_queries.run_by_public_id)(run_id)
        if run is None:
            return CLOSE_NOT_FOUND
        return run, seq_from(query(self.scope).get("after", "0")) or 0
