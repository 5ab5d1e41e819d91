"""`WS /ws/inbox/`: tells an open inbox page that its requests changed.

Authenticated by the Django session (`AuthMiddlewareStack` in orchestrator/asgi.py); closes
with 4401 for an anonymous user. It joins one group per tenant the user is a member of (staff:
the operators' group) and forwards each change as a small frame
(`{"type": "approval.decided", "approval": uuid, "status": ..., "tenant": slug}`). The page
re-reads the list from the database on every frame and on every (re)connect, so a dropped
message costs only latency. Memberships are read at connect; a reconnect picks up changes.
"""

from __future__ import annotations

from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from approvals.access import reviewer_scope
from jobs.feeds import db_call

CLOSE_UNAUTHENTICATED = 4401


class InboxConsumer(AsyncJsonWebsocketConsumer):
    joined: list[str]

    async def connect(self) -> None:
        self.joined = []
        user = self.scope.get("user")
        await self.accept()
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        scope = await db_call(reviewer_scope)(user)
        for group in scope.live_groups():
            await self.channel_layer.group_add(group, self.channel_name)
            self.joined.append(group)
        await self.send_json({"type": "hello", "groups": len(self.joined)})

    async def disconnect(self, code: int) -> None:
        for group in self.joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        pass  # nothing to ask: the page reads the list over HTTP

    async def inbox_changed(self, message: dict[str, Any]) -> None:
        await self.send_json(message["change"])
