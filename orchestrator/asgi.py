"""ASGI entry point (daphne): HTTP through Django, WebSockets through Channels routing."""

import os

from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator.settings")
# Static files (admin and dashboard assets, vendored libraries) are served by the app itself
# so that `make run` works offline with no proxy; a production deployment may put a CDN or
# proxy in front, the handler then simply sees no static requests.
django_asgi_app = ASGIStaticFilesHandler(get_asgi_application())

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from approvals.inbox.consumers import InboxConsumer  # noqa: E402
from dashboard.consumers import DashboardConsumer, OperatorRunConsumer  # noqa: E402
from jobs.api.streams import LongLivedRequests  # noqa: E402
from jobs.consumers import RunEventsConsumer, stream_token_origin_allowed  # noqa: E402


class BrowserOriginValidator:
    """Channels' AllowedHostsOriginValidator for browsers; clients that send no Origin pass.

    The Origin check stops a page on another site from opening a socket with the user's
    cookies (cross-site WebSocket hijacking). Browsers always send Origin on a WebSocket
    handshake, so a handshake without one does not come from a page, and a client that
    omits it (an SDK, a script) can only use credentials it holds anyway. Channels' validator
    refuses a missing Origin, which would shut out every non-browser client of the API.

    One kind of cross-site socket passes: a run's, bearing a stream token for that run, from
    an origin the run's tenant allows (`jobs.consumers.stream_token_origin_allowed`). A token
    is no cookie: a page has it only because the tenant's backend gave it one.
    """

    def __init__(self, application):
        self.application = application
        self.validated = AllowedHostsOriginValidator(application)

    async def __call__(self, scope, receive, send):
        headers = scope.get("headers", ())
        origin = next((value for name, value in headers if name == b"origin"), None)
        if origin is None:
            return await self.application(scope, receive, send)
        if await stream_token_origin_allowed(scope, origin.decode("latin1")):
            return await self.application(scope, receive, send)
        return await self.validated(scope, receive, send)


websocket_urlpatterns: list = [
    path("ws/runs/<str:run_id>/", RunEventsConsumer.as_asgi()),
    # The reviewers' inbox: authenticated by the Django session cookie.
    path("ws/inbox/", AuthMiddlewareStack(InboxConsumer.as_asgi())),
    # The operators' dashboard (staff, Django session).
    path("ws/dashboard/", AuthMiddlewareStack(DashboardConsumer.as_asgi())),
    path("ws/dashboard/runs/<str:run_id>/", AuthMiddlewareStack(OperatorRunConsumer.as_asgi())),
]

application = ProtocolTypeRouter(
    {
        "http": LongLivedRequests(django_asgi_app),
        "websocket": BrowserOriginValidator(URLRouter(websocket_urlpatterns)),
    }
)
