"""The example page of docs/api.md, "Streams from a browser" (static/examples/follow-run.html),
in headless Chromium: a page on the tenant's own site follows a run with EventSource and a
stream token; on a site the tenant does not allow, the browser shows it nothing.

`localhost` and `127.0.0.1` are two origins of the same web process: the page is loaded from
the first and reads the API at the second, so every request it makes is cross-origin.
"""

from __future__ import annotations

import httpx
import pytest

from tests.integration.test_streams import STEADY, submit
from tests.support.live import auth

pytestmark = pytest.mark.cluster

VIEWPORT = {"width": 1200, "height": 800}


@pytest.fixture
def web(cluster):
    return cluster.start_web(SWITCHYARD_SSE_HEARTBEAT_S="1")


def _cancelled_run_and_its_stream(web: str, key: str) -> tuple[str, str]:
    run_id = submit(web, key, STEADY)  # no scheduler: it stays accepted until cancelled
    cancelled = httpx.post(f"{web}/api/v1/runs/{run_id}/cancel/", headers=auth(key))
    assert cancelled.status_code == 200, cancelled.text
    minted = httpx.post(f"{web}/api/v1/runs/{run_id}/stream-token/", headers=auth(key))
    assert minted.status_code == 200, minted.text
    return run_id, minted.json()["sse_url"]


def test_the_example_page_follows_a_run_from_an_allowed_origin(owner, web, browser, screenshot):
    page_origin = web.replace("127.0.0.1", "localhost")
    owner.tenant.allowed_origins = [page_origin]
    owner.tenant.save(update_fields=["allowed_origins"])
    run_id, sse_url = _cancelled_run_and_its_stream(web, owner.raw_key)

    page = browser.new_page(viewport=VIEWPORT)
    page.goto(f"{page_origin}/static/examples/follow-run.html#{sse_url}")
    page.wait_for_selector("#status:has-text('Run ended: run.cancelled.')", timeout=20_000)
    # Every stored event, in order.
    log = httpx.get(f"{web}/api/v1/runs/{run_id}/events/", headers=auth(owner.raw_key))
    shown = [item.split(" ")[:2] for item in page.locator("#events li").all_inner_texts()]
    assert shown == [[f"#{event['seq']}", event["type"]] for event in log.json()["events"]]
    # The token left the address bar.
    assert "token" not in page.url
    screenshot(page, "follow-run-allowed-origin")


def test_the_example_page_reads_nothing_from_an_origin_the_tenant_does_not_allow(
    owner, web, browser, screenshot
):
    page_origin = web.replace("127.0.0.1", "localhost")
    _, sse_url = _cancelled_run_and_its_stream(web, owner.raw_key)

    page = browser.new_page(viewport=VIEWPORT)
    blocked = []
    page.on("console", lambda message: blocked.append(message.text))
    page.goto(f"{page_origin}/static/examples/follow-run.html#{sse_url}")
    # A CORS refusal is fatal to an EventSource: it closes without reconnecting.
    page.wait_for_selector("#status:has-text('Stream closed.')", timeout=20_000)
    assert page.locator("#events li").count() == 0
    assert any("CORS" in text or "Access-Control-Allow-Origin" in text for text in blocked), blocked
    screenshot(page, "follow-run-refused-origin")
