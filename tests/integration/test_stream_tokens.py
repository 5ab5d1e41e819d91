"""Stream tokens (docs/api.md, "Streams from a browser"): a tenant's backend mints a token for
one run, and a browser follows that run's SSE stream or WebSocket with it, against a real
daphne process. The token opens that run's streams and nothing else.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import httpx
import pytest
from django.utils import timezone
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from jobs.models import Run
from jobs.stream_tokens import stream_token_mint
from tests.integration.test_streams import STEADY, submit
from tests.support.live import auth, sse_frames, stored_log, ws_messages

pytestmark = pytest.mark.cluster


def mint(web: str, key: str, run_id: str) -> httpx.Response:
    return httpx.post(f"{web}/api/v1/runs/{run_id}/stream-token/", headers=auth(key))


def sse(web: str, run_id: str, token: str, **headers: str):
    """A browser's EventSource: no Authorization header, the token in the URL."""
    return httpx.stream(
        "GET",
        f"{web}/api/v1/runs/{run_id}/events/",
        params={"token": token},
        headers={"Accept": "text/event-stream", **headers},
        timeout=30,
    )


def sse_refusal(web: str, run_id: str, token: str) -> tuple[int, dict]:
    with sse(web, run_id, token) as response:
        response.read()
        return response.status_code, response.json()


def ws_close_code(url: str) -> int | None:
    with connect(url, open_timeout=10) as ws:
        for _ in ws_messages(ws, timeout=15):
            pass
        return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None


def cancel(web: str, key: str, run_id: str) -> None:
    response = httpx.post(f"{web}/api/v1/runs/{run_id}/cancel/", headers=auth(key))
    assert response.status_code == 200, response.text


def test_a_token_follows_its_run_over_sse_and_websocket(owner, web):
    # No scheduler: the run stays accepted until it is cancelled.
    run_id = submit(web, owner.raw_key, STEADY)
    minted = mint(web, owner.raw_key, run_id)
    assert minted.status_code == 200, minted.text
    body = minted.json()
    assert set(body) == {"token", "expires_at", "sse_url", "ws_url"}
    ttl = datetime.fromisoformat(body["expires_at"]) - timezone.now()
    assert timedelta(minutes=4) < ttl <= timedelta(minutes=5)
    assert body["sse_url"].startswith(f"{web}/api/v1/runs/{run_id}/events/?token=")
    assert body["ws_url"].startswith(web.replace("http://", "ws://") + f"/ws/runs/{run_id}/?token=")
    cancel(web, owner.raw_key, run_id)
    log = stored_log(web, owner.raw_key, run_id)

    with httpx.stream(
        "GET", body["sse_url"], headers={"Accept": "text/event-stream"}, timeout=30
    ) as response:
        assert response.status_code == 200
        events = [frame.data for frame in sse_frames(response) if frame.id]
    assert events == log and events[-1]["type"] == "run.cancelled"

    with connect(body["ws_url"], open_timeout=10) as ws:
        assert list(ws_messages(ws)) == log
        assert ws.protocol.close_rcvd.code == 1000


def test_a_token_opens_no_other_run_no_other_tenant_and_nothing_else(owner, outsider, web):
    run_id = submit(web, owner.raw_key, STEADY)
    other_run = submit(web, owner.raw_key, {**STEADY, "name": "steady-two"})
    foreign_run = submit(web, outsider.raw_key, STEADY)
    token = mint(web, owner.raw_key, run_id).json()["token"]

    # The outsider cannot mint one for the owner's run.
    refused = mint(web, outsider.raw_key, run_id)
    assert refused.status_code == 404
    assert refused.json() == {"error": {"code": "not_found", "message": "run not found"}}

    for target in (other_run, foreign_run):
        assert sse_refusal(web, target, token) == (
            403,
            {"error": {"code": "forbidden", "message": "this stream token is for another run"}},
        )
        url = web.replace("http://", "ws://") + f"/ws/runs/{target}/?token={token}"
        assert ws_close_code(url) == 4403

    # Not an API key: as a Bearer key, on the run's other URLs, or on a write endpoint.
    bearer = {"Authorization": f"Bearer {token}"}
    for method, path in (
        ("GET", f"/api/v1/runs/{run_id}/"),
        ("GET", f"/api/v1/runs/{run_id}/events/"),
        ("POST", f"/api/v1/runs/{run_id}/cancel/"),
        ("POST", f"/api/v1/runs/{run_id}/stream-token/"),
        ("POST", "/api/v1/runs/"),
    ):
        with_header = httpx.request(method, f"{web}{path}", headers=bearer, json={})
        assert with_header.status_code == 401, (method, path, with_header.text)
        assert with_header.json()["error"]["code"] == "unauthenticated"
        in_url = httpx.request(method, f"{web}{path}", params={"token": token}, json={})
        assert in_url.status_code == 401, (method, path, in_url.text)
        assert in_url.json()["error"]["code"] == "unauthenticated"
    with sse(web, run_id, "", Authorization=f"Bearer {token}") as response:
        response.read()
        assert response.status_code == 401
    # Nothing changed: the run is still accepted.
    detail = httpx.get(f"{web}/api/v1/runs/{run_id}/", headers=auth(owner.raw_key))
    assert detail.json()["status"] == "accepted"


def test_an_expired_or_tampered_token_is_refused(owner, web):
    run_id = submit(web, owner.raw_key, STEADY)
    run = Run.objects.select_related("tenant").get(public_id=run_id)
    expired, _ = stream_token_mint(run=run, now=timezone.now() - timedelta(hours=1))
    good = mint(web, owner.raw_key, run_id).json()["token"]
    payload, _, signature = good.rpartition(":")
    tampered = f"{payload}:{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"

    for token, message in (
        (expired, "stream token expired"),
        (tampered, "invalid stream token"),
        ("not-a-token", "invalid stream token"),
    ):
        status, body = sse_refusal(web, run_id, token)
        assert (status, body) == (401, {"error": {"code": "unauthenticated", "message": message}})
        url = web.replace("http://", "ws://") + f"/ws/runs/{run_id}/?token={token}"
        assert ws_close_code(url) == 4401, message
    # The good one still works.
    cancel(web, owner.raw_key, run_id)
    with sse(web, run_id, good) as response:
        assert response.status_code == 200
        assert json.loads(response.read().split(b"data: ")[-1])["type"] == "run.cancelled"


# --- from a page on the tenant's own site ------------------------------------------------------

APP = "https://app.example.com"
ELSEWHERE = "https://elsewhere.example"


def test_an_allowed_origin_reads_the_stream_and_opens_the_socket_others_get_neither(
    owner, outsider, web
):
    owner.tenant.allowed_origins = [APP]
    owner.tenant.save(update_fields=["allowed_origins"])
    # Allowed for another tenant: still nothing for the owner's runs.
    outsider.tenant.allowed_origins = [ELSEWHERE]
    outsider.tenant.save(update_fields=["allowed_origins"])
    run_id = submit(web, owner.raw_key, STEADY)
    other_run = submit(web, owner.raw_key, {**STEADY, "name": "steady-two"})
    token_url = f"{web}/api/v1/runs/{run_id}/stream-token/"

    # The token endpoint: a preflight (no credentials), then the call itself.
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    allowed = httpx.options(token_url, headers={"Origin": APP, **preflight})
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == APP
    assert allowed.headers["Access-Control-Allow-Methods"] == "POST"
    assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
    assert "Origin" in allowed.headers["Vary"]
    refused = httpx.options(token_url, headers={"Origin": ELSEWHERE, **preflight})
    assert refused.status_code == 204
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert "Access-Control-Allow-Methods" not in refused.headers
    minted = httpx.post(token_url, headers={**auth(owner.raw_key), "Origin": APP})
    assert minted.status_code == 200
    assert minted.headers["Access-Control-Allow-Origin"] == APP
    body = minted.json()
    elsewhere = httpx.post(token_url, headers={**auth(owner.raw_key), "Origin": ELSEWHERE})
    assert elsewhere.status_code == 200 and "Access-Control-Allow-Origin" not in elsewhere.headers

    # The SSE stream, as EventSource asks for it: CORS headers for the allowed origin only.
    cancel(web, owner.raw_key, run_id)
    log = stored_log(web, owner.raw_key, run_id)
    with sse(web, run_id, body["token"], Origin=APP) as response:
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == APP
        assert "Origin" in response.headers["Vary"]
        assert "Access-Control-Allow-Credentials" not in response.headers
        assert [frame.data for frame in sse_frames(response) if frame.id] == log
    with sse(web, run_id, body["token"], Origin=ELSEWHERE) as response:
        response.read()
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Origin" in response.headers["Vary"]

    # The socket: the token from the allowed origin opens it.
    with connect(body["ws_url"], origin=APP, open_timeout=10) as ws:
        assert list(ws_messages(ws)) == log
    ws_base, key = web.replace("http://", "ws://"), owner.raw_key
    refused_handshakes = [
        # Another site, with a good token.
        (body["ws_url"], ELSEWHERE, None),
        # The allowed site, with the token on another run's URL.
        (f"{ws_base}/ws/runs/{other_run}/?token={body['token']}", APP, None),
        # The allowed site without a token: a key in the subprotocol is not for browsers.
        (f"{ws_base}/ws/runs/{run_id}/", APP, ["switchyard.v1", f"switchyard.bearer.{key}"]),
        # The allowed site with a token that is no longer good.
        (f"{ws_base}/ws/runs/{run_id}/?token=not-a-token", APP, None),
    ]
    for url, origin, subprotocols in refused_handshakes:
        with pytest.raises(InvalidStatus) as refused_socket:
            connect(url, origin=origin, subprotocols=subprotocols, open_timeout=10)
        assert refused_socket.value.response.status_code == 403, (url, origin)
