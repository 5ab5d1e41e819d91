"""`POST /api/v1/runs/{id}/stream-token/`: a stream token for one of the tenant's runs.

The token (`jobs.stream_tokens`) lets a browser page follow the run with `EventSource` or a
WebSocket without ever holding the tenant's API key: the tenant's backend calls this with its
key and hands the answer's URLs to the page.
"""

from __future__ import annotations

from urllib.parse import urlencode

from django.urls import reverse
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from jobs import selectors
from jobs.api import openapi
from jobs.api.errors import not_found
from jobs.formats import iso
from jobs.stream_tokens import stream_token_mint


class StreamTokenOut(serializers.Serializer):
    token = serializers.CharField()
    expires_at = serializers.DateTimeField()
    sse_url = serializers.URLField(help_text="The run's SSE stream, token included.")
    ws_url = serializers.CharField(help_text="The run's WebSocket, token included.")


class StreamTokenView(APIView):
    @extend_schema(
        tags=["runs"],
        operation_id="runs_stream_token",
        summary="Mint a short-lived token that opens this run's streams from a browser",
        parameters=[openapi.RUN_ID],
        request=None,
        responses={200: StreamTokenOut, **openapi.errors(404)},
    )
    def post(self, request: Request, run_id: str) -> Response:
        run = selectors.run_for(tenant=request.user.tenant, run_id=run_id)
        if run is None:
            raise not_found("run")
        token, expires_at = stream_token_mint(run=run, now=timezone.now())
        query = "?" + urlencode({"token": token})
        events = reverse("api:run-events", kwargs={"run_id": run.public_id})
        scheme = "wss" if request.is_secure() else "ws"
        return Response(
            {
                "token": token,
                "expires_at": iso(expires_at),
                "sse_url": request.build_absolute_uri(events) + query,
                "ws_url": f"{scheme}://{request.get_host()}/ws/runs/{run.public_id}/{query}",
            }
        )
