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

Close codes: 4401 not signed in, 4403 not staff, 4404 no such run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.template.loader import render_to_string
from django.utils import timezone

from dashboard import health, overview_page, run_queries, sampling, tenant_usage
from jobs.events import DASHBOARD_GROUP
from jobs.feeds import Idle, RunFeed, db_call
from schedules.dashboard import events_frame, schedules_frame

log = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
# At most one push per this interval, however many runs change.
MIN_GAP_S = 0.5
VIEWS = ("overview", "workers", "tenants", "schedules", "events")
CHART_WINDOW = timedelta(hours=1)


def _query(scope: dict[str, Any]) -> dict[str, str]:
    parsed = parse_qs(scope.get("query_string", b"").decode("latin1"))
    return {name: values[-1] for name, values in parsed.items()}


async def _admit(consumer: AsyncJsonWebsocketConsumer) -> bool:
    """Accept the socket; close it (and return False) unless the user is staff."""
    user = consumer.scope.get("user")
    await consumer.accept()
    if user is None or not user.is_authenticated:
        await consumer.close(code=CLOSE_UNAUTHENTICATED)
        return False
    if not user.is_staff:
        await consumer.close(code=CLOSE_FORBIDDEN)
        return False
    return True


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
        if not await _admit(self):
            return
        query = _query(self.scope)
        self.view = query.get("view") if query.get("view") in VIEWS else "overview"
        try:
            since = float(query.get("since", "0"))
        except ValueError:
            since = 0.0
        self.chart_since = datetime.fromtimestamp(max(since, 0.0), UTC)
        # The Tenants page sends its own search, sort and page along.
        self.tenant_query = tenant_usage.TenantQuery.from_query(query)
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


class OperatorRunConsumer(AsyncJsonWebsocketConsumer):
    # No channel of the consumer's own: the RunFeed subscribes on one it reads itself.
    channel_layer_alias = None
    feed: RunFeed | None = None
    streaming: asyncio.Task | None = None

    async def connect(self) -> None:
        if not await _admit(self):
            return
        run_id = self.scope["url_route"]["kwargs"]["run_id"]
        run = await db_call(run_queries.run_by_public_id)(run_id)
        if run is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        raw = _query(self.scope).get("after", "0")
        self.feed = RunFeed(run, after=int(raw) if raw.isdigit() else 0, deltas=False)
        await self.feed.__aenter__()
        self.streaming = asyncio.create_task(self._stream(self.feed))

    async def disconnect(self, code: int) -> None:
        if self.streaming is not None and self.streaming is not asyncio.current_task():
            self.streaming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.streaming
        if self.feed is not None:
            await self.feed.__aexit__(None, None, None)
            self.feed = None

    async def _stream(self, feed: RunFeed) -> None:
        try:
            async for item in feed.items(idle_s=float(settings.SWITCHYARD_SSE_HEARTBEAT_S)):
                if not isinstance(item, Idle):
                    await self.send_json(item.payload)
        except Exception:
            log.exception("operator run stream %s failed", feed.run.public_id)
            await self.close(code=1011)
            return
        await self.close(code=1000)
