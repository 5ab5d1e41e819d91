"""The table, the targets, report.md and results.json of a bench run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from contextlib import suppress
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

SCENARIOS = [
    ("s1", "1. Motivating scenario"),
    ("s2", "2. Submission latency"),
    ("s3", "3. Per-step overhead"),
    ("s4", "4. Throughput"),
    ("s5", "5. Noisy neighbour"),
    ("s6", "6. Streams"),
    ("s7", "7. Growth"),
]


# --- the machine ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "ram_gib": _ram_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    for package in (
        "Django",
        "djangorestframework",
        "celery",
        "kombu",
        "channels",
        "daphne",
        "psycopg",
        "gunicorn",
        "httpx",
    ):
        with suppress(metadata.PackageNotFoundError):
            info[package] = metadata.version(package)
    info.update(_services())
    info.update(database_probe())
    return info


def database_probe(samples: int = 100) -> dict[str, float]:
    """PostgreSQL round trip and durable commit (WAL fsync) latency, medians in ms.

    Every step transition is a durable commit: this machine's fsync latency (and whatever
    else writes to the same disk at the time) bounds what the engine can do.
    """
    import time

    import psycopg
    from django.db import connection

    params = connection.settings_dict
    found: dict[str, float] = {}
    with (
        suppress(Exception),
        psycopg.connect(
            dbname=params["NAME"],
            user=params["USER"],
            host=params["HOST"],
            port=params["PORT"],
            autocommit=True,
        ) as conn,
    ):
        conn.execute("CREATE TABLE IF NOT EXISTS bench_probe (n int)")
        rtt, commit = [], []
        for _ in range(samples):
            t0 = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            rtt.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            conn.execute("INSERT INTO bench_probe VALUES (1)")
            commit.append((time.perf_counter() - t0) * 1000)
        conn.execute("DROP TABLE bench_probe")
        rtt.sort()
        commit.sort()
        found["pg_round_trip_ms_p50"] = round(rtt[len(rtt) // 2], 3)
        found["pg_durable_commit_ms_p50"] = round(commit[len(commit) // 2], 2)
        found["pg_durable_commit_ms_p90"] = round(commit[int(len(commit) * 0.9)], 2)
    return found


def _cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _ram_gib() -> float:
    with suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def _services() -> dict[str, Any]:
    found: dict[str, Any] = {}
    with suppress(Exception):
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            found["postgresql"] = cursor.fetchone()[0]
            cursor.execute("SHOW max_connections")
            found["postgresql_max_connections"] = int(cursor.fetchone()[0])
    with suppress(Exception):
        from django.conf import settings
        from kombu import Connection

        with Connection(settings.CELERY_BROKER_URL, connect_timeout=5) as conn:
            conn.connect()
            version = conn.connection.server_properties.get("version")
            found["rabbitmq"] = version.decode() if isinstance(version, bytes) else version
    with suppress(Exception):
        import redis
        from django.conf import settings

        found["redis"] = redis.Redis.from_url(settings.REDIS_URL).info("server")["redis_version"]
    return found


# --- targets -------------------------------------------------------------------------------


def _target(name: str, goal: str, measured: str, met: bool | None, gap: str = "") -> dict:
    return {"target": name, "goal": goal, "measured": measured, "met": met, "gap": gap}


def _times(value: float | None, limit: float) -> str:
    if value is None or not limit:
        return ""
    return f"{value / limit:.1f}x the limit"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    s2 = results.get("s2") or {}
    if "latency_ms" in s2:
        p50, p99, errors = s2["latency_ms"]["p50"], s2["latency_ms"]["p99"], s2["errors"]
        met = p50 is not None and p50 <= 15 and p99 is not None and p99 <= 60 and errors == 0
        gaps = []
        if p50 is not None and p50 > 15:
            gaps.append(f"P50 {_times(p50, 15)}")
        if p99 is not None and p99 > 60:
            gaps.append(f"P99 {_times(p99, 60)}")
        if errors:
            gaps.append(f"{errors} errors ({s2['errors'] / max(1, s2['requests']):.1%})")
        found.append(
            _target(
                "Submission at 200 concurrent clients",
                "P50 ≤ 15 ms, P99 ≤ 60 ms, no errors",
                f"P50 {p50} ms, P99 {p99} ms, {errors} errors of {s2['requests']}",
                met,
                "; ".join(gaps),
            )
        )
    s1 = results.get("s1") or {}
    if "switchyard" in s1:
        sw, sync = s1["switchyard"], s1["sync"]
        got = sw["completed_received"] + sw.get("collected_after_the_stream", 0)
        met = sw["results_lost"] == 0 and sw["timeouts"] == 0 and sw["requests"] == got
        found.append(
            _target(
                "Motivating scenario",
                "Switchyard: 0 lost results, 0 timeout failures (vs the synchronous deployment)",
                f"Switchyard {sw['results_lost']} lost, {sw['timeouts']} timeouts, "
                f"{got}/{sw['requests']} results received; synchronous "
                f"{sync['results_lost']} lost, {sync['timeouts']} timeouts",
                met,
                "" if met else f"{sw['requests'] - got} users without a result",
            )
        )
    s3 = results.get("s3") or {}
    if "idle_dispatch_ms" in s3:
        p50, p99 = s3["idle_dispatch_ms"]["p50"], s3["idle_dispatch_ms"]["p99"]
        met = p50 is not None and p50 <= 5 and p99 is not None and p99 <= 25
        gaps = [
            g
            for g in (
                f"P50 {_times(p50, 5)}" if p50 and p50 > 5 else "",
                f"P99 {_times(p99, 25)}" if p99 and p99 > 25 else "",
            )
            if g
        ]
        found.append(
            _target(
                "Idle dispatch (ready → handler starts)",
                "P50 ≤ 5 ms, P99 ≤ 25 ms",
                f"P50 {p50} ms, P99 {p99} ms",
                met,
                "; ".join(gaps),
            )
        )
    if "ratio" in s3:
        ratio = s3["ratio"]
        found.append(
            _target(
                "Per-step overhead",
                "≤ 3x the raw Celery chain's ms per step",
                f"{s3['switchyard_ms_per_step']} ms vs {s3['raw_ms_per_step']} ms: {ratio}x",
                ratio is not None and ratio <= 3,
                f"{ratio / 3:.1f}x the limit" if ratio and ratio > 3 else "",
            )
        )
    s4 = results.get("s4") or {}
    if "zero_latency_steps_per_s" in s4:
        rate, share = s4["zero_latency_steps_per_s"], s4["share_of_raw"]
        met = rate >= 500 and share is not None and share >= 0.35
        gaps = []
        if rate < 500:
            gaps.append(f"{rate / 500:.0%} of 500 steps/s")
        if share is not None and share < 0.35:
            gaps.append(f"{share:.0%} of raw (needs 35 %)")
        found.append(
            _target(
                "Zero-latency throughput",
                "≥ 500 checkpointed steps/s and ≥ 35 % of raw Celery no-op throughput",
                f"{rate} steps/s = {share:.1%} of raw Celery's {s4['raw_celery_tasks_per_s']}/s"
                if share is not None
                else f"{rate} steps/s",
                met,
                "; ".join(gaps),
            )
        )
    s5 = results.get("s5") or {}
    if "wait_ms" in s5:
        waits = s5["wait_ms"]
        fair95 = waits["flood, fair"]["p95"]
        fifo95 = waits["flood, fifo"]["p95"]
        limit = s5["fair_limit_p95_ms"]
        met = fair95 is not None and fair95 <= limit and fifo95 is not None and fifo95 >= 5 * fair95
        found.append(
            _target(
                "Noisy neighbour",
                "A's P95 under B's flood ≤ 1.5 x alone + 20 ms; FIFO far worse (≥ 5x fair)",
                f"alone P95 {waits['A alone']['p95']} ms, fair {fair95} ms (limit {limit}), "
                f"fifo {fifo95} ms",
                met,
                f"fair {_times(fair95, limit)}" if fair95 and fair95 > limit else "",
            )
        )
    s6 = results.get("s6") or {}
    if "delivery_ms" in s6:
        p99 = s6["delivery_ms"]["p99"]
        finished = s6.get("clients_finished")
        met = p99 is not None and p99 <= 250 and not s6["client_errors"]
        found.append(
            _target(
                "Streams",
                "P99 delivery ≤ 250 ms with 1,000 clients",
                f"P99 {p99} ms, P50 {s6['delivery_ms']['p50']} ms; {finished} clients "
                f"finished, {s6['client_errors']} errors; web RSS peak "
                f"{s6['web_rss_mb']['peak']} MiB",
                met,
                f"P99 {_times(p99, 250)}" if p99 and p99 > 250 else "",
            )
        )
    s7 = results.get("s7") or {}
    if "cycle_growth" in s7:
        growth = s7["cycle_growth"]
        found.append(
            _target(
                "Growth",
                "100x the backlog costs ≤ 2x the cycle time",
                f"{s7['backlog_growth']}x backlog: cycle x{growth}, admission decision "
                f"x{s7['decide_growth']} (log-log slopes {s7['cycle_slope']}, "
                f"{s7['decide_slope']})",
                growth is not None and growth <= 2,
                f"cycle x{growth} (limit x2)" if growth and growth > 2 else "",
            )
        )
    return found


# --- the table -----------------------------------------------------------------------------


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []

    def add(scenario: str, metric: str, value: str) -> None:
        rows.append((scenario, metric, value))

    s1 = results.get("s1") or {}
    if "switchyard" in s1:
        for side, name in (("sync", "synchronous"), ("switchyard", "Switchyard")):
            r = s1[side]
            add(
                "1 motivating",
                f"{name}: response P50 / P99",
                f"{r['response_ms']['p50']} / {r['response_ms']['p99']} ms",
            )
            add(
                "1 motivating",
                f"{name}: gateway timeouts",
                f"{r['timeouts']} of {r['requests']} ({r['timeout_share']:.1%})",
            )
            add(
                "1 motivating",
                f"{name}: results received / lost",
                f"{r['completed_received'] + r.get('collected_after_the_stream', 0)} / "
                f"{r['results_lost']} of {r['requests']}",
            )
            add(
                "1 motivating",
                f"{name}: workflows/s received by clients (done by the server)",
                f"{r['completed_per_s']} ({r['server_completed_per_s']})",
            )
            add(
                "1 motivating",
                f"{name}: end-to-end P50 / P95",
                f"{r['end_to_end_ms']['p50']} / {r['end_to_end_ms']['p95']} ms",
            )
    s2 = results.get("s2") or {}
    if "latency_ms" in s2:
        lat = s2["latency_ms"]
        add(
            "2 submission",
            "200 clients: P50 / P99 / max",
            f"{lat['p50']} / {lat['p99']} / {lat['max']} ms",
        )
        add("2 submission", "errors; requests/s", f"{s2['errors']}; {s2['requests_per_s']}/s")
        single = s2["single_client_ms"]
        add("2 submission", "1 client: P50 / P99", f"{single['p50']} / {single['p99']} ms")
    s3 = results.get("s3") or {}
    if "ratio" in s3:
        add(
            "3 overhead",
            "ms per step: Switchyard / raw Celery",
            f"{s3['switchyard_ms_per_step']} / {s3['raw_ms_per_step']} ms ({s3['ratio']}x)",
        )
        idle = s3["idle_dispatch_ms"]
        add("3 overhead", "idle dispatch P50 / P99", f"{idle['p50']} / {idle['p99']} ms")
    s4 = results.get("s4") or {}
    if "zero_latency_steps_per_s" in s4:
        add("4 throughput", "zero-latency steps/s", f"{s4['zero_latency_steps_per_s']}")
        add(
            "4 throughput",
            "50 ms llm steps/s",
            f"{s4['llm_steps_per_s']} (ceiling {s4['llm_ceiling_steps_per_s']})",
        )
        add(
            "4 throughput",
            "raw Celery no-op tasks/s; share",
            f"{s4['raw_celery_tasks_per_s']}; {(s4['share_of_raw'] or 0):.1%}",
        )
    s5 = results.get("s5") or {}
    if "wait_ms" in s5:
        for phase, w in s5["wait_ms"].items():
            add("5 noisy neighbour", f"A's wait P50 / P95, {phase}", f"{w['p50']} / {w['p95']} ms")
    s6 = results.get("s6") or {}
    if "delivery_ms" in s6:
        d = s6["delivery_ms"]
        add("6 streams", "delivery P50 / P99", f"{d['p50']} / {d['p99']} ms")
        rss = s6["web_rss_mb"]
        add(
            "6 streams",
            "web RSS before / peak",
            f"{rss['before']} / {rss['peak']} MiB ({rss['per_client_kib']} KiB per client)",
        )
    s7 = results.get("s7") or {}
    if "rows" in s7:
        for row in s7["rows"]:
            add(
                "7 growth",
                f"{row['backlog']:,} ready: cycle / decide / submit P50",
                f"{row['cycle_ms']} / {row['decide_ms']} / {row['submission_ms']['p50']} ms",
            )
        add(
            "7 growth",
            "log-log slope cycle / decide / submit",
            f"{s7['cycle_slope']} / {s7['decide_slope']} / {s7['submission_slope']}",
        )
    for key, _title in SCENARIOS:
        if (results.get(key) or {}).get("error"):
            add(key, "FAILED", results[key]["error"].splitlines()[-1][:100])
    return rows


def text_table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)] if rows else [0, 0, 0]
    lines = []
    previous = None
    for scenario, metric, value in rows:
        shown = scenario if scenario != previous else ""
        previous = scenario
        lines.append(f"{shown:<{widths[0]}}  {metric:<{widths[1]}}  {value}")
    return "\n".join(lines)


def markdown_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| scenario | metric | value |", "|---|---|---|"]
    previous = None
    for scenario, metric, value in rows:
        shown = scenario if scenario != previous else ""
        previous = scenario
        lines.append(f"| {shown} | {metric} | {value} |")
    return "\n".join(lines)


def markdown_targets(found: list[dict[str, Any]]) -> str:
    lines = ["| target | goal | measured | met | gap |", "|---|---|---|---|---|"]
    for t in found:
        met = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {met} | {t['gap']} |")
    return "\n".join(lines)


# --- files ---------------------------------------------------------------------------------


def write(outdir: Path, run: dict[str, Any]) -> tuple[str, str]:
    """Write results.json and report.md; returns (text table, markdown targets)."""
    results = run["scenarios"]
    run["targets"] = targets(results)
    rows = table_rows(results)
    (outdir / "results.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
    (outdir / "report.md").write_text(_markdown(run, rows))
    return text_table(rows), markdown_targets(run["targets"])


def _markdown(run: dict[str, Any], rows) -> str:
    m = run["machine"]
    parts = [
        f"# Switchyard benchmark, {run['started']}",
        "",
        f"Mode: **{run['mode']}**, {run['duration_s']:.0f} s. Machine: {m['cores']} cores "
        f"({m['cpu']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}; Python {m['python']}, "
        f"Django {m.get('Django')}, Celery {m.get('celery')}, kombu {m.get('kombu')}, daphne "
        f"{m.get('daphne')}, channels {m.get('channels')}, gunicorn {m.get('gunicorn')}; "
        f"PostgreSQL {m.get('postgresql')} (max_connections {m.get('postgresql_max_connections')}),"
        f" RabbitMQ {m.get('rabbitmq')}, Redis {m.get('redis')}. PostgreSQL round trip "
        f"{m.get('pg_round_trip_ms_p50')} ms, durable commit {m.get('pg_durable_commit_ms_p50')} "
        f"ms (P90 {m.get('pg_durable_commit_ms_p90')}). Load average at start "
        f"{m['load_average_at_start']}, at end {run.get('load_average_at_end')} (other work on "
        "the machine shows here).",
        "",
        "Every process (web, scheduler, workers, both baselines, the load generators) shares "
        "these cores with PostgreSQL, RabbitMQ and Redis. Latencies are nearest-rank "
        "percentiles over each scenario's samples; ratios compare figures of this run.",
        "",
        "## Results",
        "",
        markdown_table(rows),
        "",
        "## Targets",
        "",
        *(
            [
                "A quick run uses smaller sizes than the targets assume (fewer clients, "
                "shorter floods): met or missed here is indicative only.",
                "",
            ]
            if run["mode"] == "quick"
            else []
        ),
        markdown_targets(run["targets"]),
        "",
        "## Deployment",
        "",
        "```",
        json.dumps(run["params"]["deployment"], indent=2),
        "```",
        "",
        "Settings for every Switchyard process: "
        + ", ".join(f"`{k}={v}`" for k, v in run["environment"].items())
        + " (as `.env.example`, but for DEBUG, the log level and the pool capacities).",
        "",
    ]
    for key, title in SCENARIOS:
        result = run["scenarios"].get(key)
        if not result:
            continue
        parts += [f"## {title}: {result.get('title', '')}", ""]
        if result.get("error"):
            parts += ["Failed:", "", "```", result["error"], "```", ""]
            continue
        parts += ["Parameters:", ""]
        parts += [f"- {name}: {value}" for name, value in result.get("params", {}).items()]
        parts += ["", "Measured:", "", "```json", json.dumps(_brief(result), indent=2), "```", ""]
        if result.get("chart"):
            parts += [f"![{title}]({result['chart']})", ""]
    if run.get("profiles"):
        parts += [
            "## Profiles (py-spy)",
            "",
            "The project's frames by inclusive share of each process's samples while the "
            "scenario measured, with the line of each that most samples passed through.",
            "",
        ]
        for profile in run["profiles"]:
            parts += [f"### [{profile['file']}]({profile['file']}): {profile['samples']} samples"]
            parts += ["", "| share | frame | hottest line |", "|---|---|---|"]
            parts += [
                f"| {row['share']:.0%} | `{row['frame']}` | `{row['hottest']}` |"
                for row in profile["project_inclusive"]
            ]
            parts.append("")
    return "\n".join(parts)


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    """A scenario's measurements without the long sample lists."""

    def trim(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: trim(v)
                for k, v in value.items()
                if k not in ("params", "title", "chart", "all_latencies_ms")
            }
        if isinstance(value, list) and len(value) > 12:
            return f"[{len(value)} values]"
        return value

    return trim(result)


def update_latest(results_root: Path, outdir: Path) -> None:
    latest = results_root / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(outdir.name)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def git_free_revision() -> str:
    """The checked-out commit, read from .git without running git (for the report)."""
    with suppress(OSError, subprocess.SubprocessError):
        root = Path(__file__).resolve().parents[1] / ".git"
        head = (root / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = root / head[5:]
            if ref.exists():
                return ref.read_text().strip()[:12]
            packed = root / "packed-refs"
            for line in packed.read_text().splitlines():
                if line.endswith(head[5:]):
                    return line.split()[0][:12]
        return head[:12]
    return "unknown"
