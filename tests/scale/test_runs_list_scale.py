"""The operators' runs list stays fast with a million runs in the table (docs/dashboard.md).

One bulk `INSERT ... SELECT generate_series` seeds 1,000,000 runs over two tenants, two
workflows, three lanes and a few statuses (4 % failed, with three error texts), then every filter of
the list is timed through the page. The times are printed (`-s` shows them); the assertion
is a generous 1 s per page.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from jobs.models import Run
from jobs.services.workflows import workflow_version_create
from tests.support.dashboard import chain, make_operator

ROWS = 1_000_000

_SEED = """
INSERT INTO jobs_run (public_id, tenant_id, workflow_version_id, input, lane, status, output,
                      error, idempotency_key, request_hash, webhook_url, next_seq, created_at,
                      started_at, finished_at, updated_at, parent_step_id)
SELECT gen_random_uuid(),
       CASE WHEN i %% 10 = 1 THEN %(small)s ELSE %(big)s END,
       CASE WHEN i %% 10 = 1 THEN %(small_version)s
            WHEN i %% 3 = 0 THEN %(other_version)s ELSE %(big_version)s END,
       '{}'::jsonb,
       (ARRAY['interactive', 'standard', 'batch'])[1 + i %% 3],
       CASE WHEN i %% 50 IN (0, 1) THEN 'failed' WHEN i %% 997 = 0 THEN 'running'
            ELSE 'succeeded' END,
       NULL,
       CASE WHEN i %% 50 IN (0, 1) THEN
            'step ''fetch'' failed: upstream ' ||
            (ARRAY['timeout after 30 s', 'answered 503', 'refused the connection'])[1 + i / 50 %% 3]
            ELSE '' END,
       '', '', '', 1,
       now() - make_interval(secs => i * 2.5),
       now() - make_interval(secs => i * 2.5 - 0.2),
       CASE WHEN i %% 997 = 0 THEN NULL ELSE now() - make_interval(secs => i * 2.5 - 3) END,
       now(), NULL
FROM generate_series(1, %(rows)s) AS i
"""


@pytest.fixture
def million_runs(owner, outsider):
    big = workflow_version_create(tenant=owner.tenant, document=chain("triage", "a", "b"))
    other = workflow_version_create(tenant=owner.tenant, document=chain("billing", "a"))
    small = workflow_version_create(tenant=outsider.tenant, document=chain("triage", "a"))
    started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute(
            _SEED,
            {
                "small": outsider.tenant.pk,
                "big": owner.tenant.pk,
                "small_version": small.pk,
                "other_version": other.pk,
                "big_version": big.pk,
                "rows": ROWS,
            },
        )
        cursor.execute("ANALYZE jobs_run")
    print(f"\nseeded {ROWS:,} runs in {time.monotonic() - started:.1f} s")


def test_the_runs_list_answers_in_under_a_second_with_a_million_runs(million_runs):
    staff = Client()
    staff.force_login(make_operator())
    assert Run.objects.count() == ROWS
    middle = Run.objects.order_by("-created_at", "-id").values_list("public_id", flat=True)[
        ROWS // 2
    ]
    now = timezone.now()
    day_start = (now - timedelta(days=10)).strftime("%Y-%m-%dT%H:%M")
    day_end = (now - timedelta(days=9)).strftime("%Y-%m-%dT%H:%M")
    pages = {
        "newest first": "",
        "tenant": "?tenant=outsider",
        "status failed": "?status=failed",
        "status running": "?status=running",
        "lane interactive": "?lane=interactive",
        "workflow": "?workflow=billing",
        "tenant + workflow + failed": "?tenant=owner&workflow=triage&status=failed",
        "error text": "?error=refused",
        "error text, rare": "?error=answered+503&tenant=outsider",
        "time range, a day 10 days ago": f"?since={day_start}&until={day_end}",
        "page 10,000 (keyset)": f"?after={middle}",
        "failed, older page": f"?status=failed&after={middle}",
    }
    timings = {}
    for name, query in pages.items():
        staff.get(f"/dashboard/runs/{query}")  # warm the plan cache once
        started = time.monotonic()
        response = staff.get(f"/dashboard/runs/{query}")
        timings[name] = (time.monotonic() - started) * 1000
        assert response.status_code == 200, name
        assert response.content.count(b"<tr data-run=") == 50, name
    width = max(len(name) for name in timings)
    print(f"runs list with {ROWS:,} runs, whole request (ms):")
    for name, elapsed in timings.items():
        print(f"  {name:<{width}}  {elapsed:7.1f}")
    slow = {name: round(ms) for name, ms in timings.items() if ms >= 1000}
    assert not slow, slow
