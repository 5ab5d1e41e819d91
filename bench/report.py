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

from bench.params import TARGETS

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
        "dbos",
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
    t = TARGETS
    found = []
    s2 = results.get("s2") or {}
    if "open_loop" in s2:
        o = s2["open_loop"]
        p50, p99, errors = o["latency_ms"]["p50"], o["latency_ms"]["p99"], o["errors"]
        gaps = []
        if p50 is None or p50 > t.open_loop_p50_ms:
            gaps.append(f"P50 {_times(p50, t.open_loop_p50_ms)}")
        if p99 is None or p99 > t.open_loop_p99_ms:
            gaps.append(f"P99 {_times(p99, t.open_loop_p99_ms)}")
        if errors:
            gaps.append(f"{errors} errors ({errors / max(1, o['requests']):.1%})")
        found.append(
            _target(
                "Submission, open loop",
                f"{o['offered_per_s']:g} submissions/s offered by {s2['params']['clients']} "
                f"clients: P50 ≤ {t.open_loop_p50_ms:g} ms, P99 ≤ {t.open_loop_p99_ms:g} ms, "
                "no errors",
                f"P50 {p50} ms, P99 {p99} ms, max {o['latency_ms']['max']} ms, {errors} errors "
                f"of {o['requests']}; {o['achieved_per_s']}/s achieved",
                not gaps,
                "; ".join(gaps),
            )
        )
    if "closed_loop" in s2:
        rate = s2["closed_loop"]["accepted_per_s"]
        found.append(
            _target(
                "Submission, closed loop",
                f"≥ {t.closed_loop_per_s:g} submissions/s from {s2['params']['clients']} clients "
                "submitting back to back",
                f"{rate}/s ({s2['closed_loop']['errors']} errors)",
                rate >= t.closed_loop_per_s,
                f"{rate / t.closed_loop_per_s:.0%} of {t.closed_loop_per_s:g}/s"
                if rate < t.closed_loop_per_s
                else "",
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
        limit50, limit99 = t.idle_dispatch_p50_ms, t.idle_dispatch_p99_ms
        met = p50 is not None and p50 <= limit50 and p99 is not None and p99 <= limit99
        gaps = [
            g
            for g in (
                f"P50 {_times(p50, limit50)}" if p50 and p50 > limit50 else "",
                f"P99 {_times(p99, limit99)}" if p99 and p99 > limit99 else "",
            )
            if g
        ]
        found.append(
            _target(
                "Idle dispatch (ready → handler starts)",
                f"P50 ≤ {limit50:g} ms, P99 ≤ {limit99:g} ms",
                f"P50 {p50} ms, P99 {p99} ms",
                met,
                "; ".join(gaps),
            )
        )
    if "ratio" in s3:
        ratio, limit = s3["ratio"], t.overhead_vs_raw
        found.append(
            _target(
                "Per-step overhead",
                f"≤ {limit:g}x the raw Celery chain's ms per step (chain of 50)",
                f"{s3['switchyard_ms_per_step']} ms vs {s3['raw_ms_per_step']} ms: {ratio}x",
                ratio is not None and ratio <= limit,
                f"{ratio / limit:.1f}x the limit" if ratio and ratio > limit else "",
            )
        )
    s4 = results.get("s4") or {}
    if "zero_latency_steps_per_s" in s4:
        rate, share = s4["zero_latency_steps_per_s"], s4["share_of_raw"]
        floor, part = t.throughput_steps_per_s, t.throughput_share_of_raw
        met = rate >= floor and share is not None and share >= part
        gaps = []
        if rate < floor:
            gaps.append(f"{rate / floor:.0%} of {floor:g} steps/s")
        if share is not None and share < part:
            gaps.append(f"{share:.0%} of raw (needs {part:.0%})")
        found.append(
            _target(
                "Zero-latency throughput",
                f"≥ {floor:g} checkpointed steps/s and ≥ {part:.0%} of raw Celery no-op "
                "throughput in the same run",
                f"{rate} steps/s = {share:.1%} of raw Celery's {s4['raw_celery_tasks_per_s']}/s"
                if share is not None
                else f"{rate} steps/s",
                met,
                "; ".join(gaps),
            )
        )
    if s3.get("dbos_ms_per_step") or s4.get("dbos_steps_per_s"):
        found.append(_ahead_of_dbos(s3, s4))
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
    for name, phase in (("Streams (SSE)", s6), ("Streams (WebSocket)", s6.get("websocket"))):
        if not phase or "delivery_ms" not in phase:
            continue
        p99, limit = phase["delivery_ms"]["p99"], t.streams_p99_ms
        finished = phase.get("clients_finished")
        faults = phase.get("events_missing", 0) + phase.get("events_out_of_order_or_repeated", 0)
        met = p99 is not None and p99 <= limit and not phase["client_errors"] and not faults
        found.append(
            _target(
                name,
                f"P99 delivery ≤ {limit:g} ms with 1,000 clients",
                f"P99 {p99} ms, P50 {phase['delivery_ms']['p50']} ms; {finished} clients "
                f"finished, {phase['client_errors']} errors, {faults} events missing, "
                f"repeated or out of order; web RSS peak {phase['web_rss_mb']['peak']} MiB",
                met,
                f"P99 {_times(p99, limit)}" if p99 and p99 > limit else "",
            )
        )
    s7 = results.get("s7") or {}
    if "cycle_growth" in s7:
        growth, limit = s7["cycle_growth"], t.growth_cycle_ratio
        found.append(
            _target(
                "Growth",
                f"100x the backlog costs ≤ {limit:g}x the cycle time",
                f"{s7['backlog_growth']}x backlog: cycle x{growth}, admission decision "
                f"x{s7['decide_growth']} (log-log slopes {s7['cycle_slope']}, "
                f"{s7['decide_slope']})",
                growth is not None and growth <= limit,
                f"cycle x{growth} (limit x{limit:g})" if growth and growth > limit else "",
            )
        )
    return found


def _ahead_of_dbos(s3: dict[str, Any], s4: dict[str, Any]) -> dict[str, Any]:
    """Switchyard ahead of DBOS Transact: fewer ms per step in the chain (scenario 3) and
    more steps/s at saturation (scenario 4)."""
    measured, gaps, met = [], [], True
    if s3.get("dbos_ms_per_step"):
        ratio = s3["dbos_ratio"]
        measured.append(
            f"chain {s3['switchyard_ms_per_step']} vs {s3['dbos_ms_per_step']} ms/step "
            f"({ratio}x DBOS's)"
        )
        if ratio is None or ratio >= 1:
            met = False
            gaps.append(f"chain {ratio}x DBOS's ms/step")
    if s4.get("dbos_steps_per_s"):
        ratio = s4["dbos_ratio"]
        measured.append(
            f"throughput {s4['zero_latency_steps_per_s']} vs {s4['dbos_steps_per_s']} steps/s "
            f"({ratio}x DBOS's; runs of {s4['fan_width']}: {s4['dbos_fan_ratio']}x)"
        )
        if ratio is None or ratio <= 1:
            met = False
            gaps.append(f"throughput {ratio}x DBOS's")
    return _target(
        "Ahead of DBOS Transact",
        "fewer ms per step than DBOS in the 50-step chain; more zero-latency steps/s than "
        "DBOS's one-step workflows",
        "; ".join(measured),
        met,
        "; ".join(gaps),
    )


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
    if "open_loop" in s2:
        o, c = s2["open_loop"], s2["closed_loop"]
        lat = o["latency_ms"]
        add(
            "2 submission",
            f"open loop, {o['offered_per_s']:g}/s offered: P50 / P99 / max",
            f"{lat['p50']} / {lat['p99']} / {lat['max']} ms",
        )
        add(
            "2 submission",
            "open loop: errors; achieved",
            f"{o['errors']} of {o['requests']}; {o['achieved_per_s']}/s",
        )
        add(
            "2 submission",
            "closed loop: submissions/s (P50 latency)",
            f"{c['accepted_per_s']}/s ({c['latency_ms']['p50']} ms); {c['errors']} errors",
        )
        single = s2["single_client_ms"]
        add("2 submission", "1 client: P50 / P99", f"{single['p50']} / {single['p99']} ms")
    s3 = results.get("s3") or {}
    if "ratio" in s3:
        add(
            "3 overhead",
            "ms per step: Switchyard / raw Celery / DBOS",
            f"{s3['switchyard_ms_per_step']} / {s3['raw_ms_per_step']} / "
            f"{s3.get('dbos_ms_per_step')} ms",
        )
        add(
            "3 overhead",
            "Switchyard's ms per step ÷ raw Celery's / ÷ DBOS's",
            f"{s3['ratio']}x / {s3.get('dbos_ratio')}x",
        )
        idle = s3["idle_dispatch_ms"]
        add("3 overhead", "idle dispatch P50 / P99", f"{idle['p50']} / {idle['p99']} ms")
    s4 = results.get("s4") or {}
    if "zero_latency_steps_per_s" in s4:
        width = s4.get("fan_width", 20)
        add(
            "4 throughput",
            f"Switchyard zero-latency steps/s: one per run; runs of {width}",
            f"{s4['zero_latency_steps_per_s']}; {s4['fan_out_steps_per_s']}",
        )
        add(
            "4 throughput",
            "50 ms llm steps/s",
            f"{s4['llm_steps_per_s']} (ceiling {s4['llm_ceiling_steps_per_s']})",
        )
        add(
            "4 throughput",
            "raw Celery no-op tasks/s; Switchyard's share",
            f"{s4['raw_celery_tasks_per_s']}; {(s4['share_of_raw'] or 0):.1%}",
        )
        add(
            "4 throughput",
            f"DBOS no-op steps/s: one-step workflows; {width}-step",
            f"{s4.get('dbos_steps_per_s')}; {s4.get('dbos_fan_steps_per_s')}",
        )
        add(
            "4 throughput",
            f"Switchyard's steps/s ÷ DBOS's: one per run; runs of {width}",
            f"{s4.get('dbos_ratio')}x; {s4.get('dbos_fan_ratio')}x",
        )
    s5 = results.get("s5") or {}
    if "wait_ms" in s5:
        for phase, w in s5["wait_ms"].items():
            add("5 noisy neighbour", f"A's wait P50 / P95, {phase}", f"{w['p50']} / {w['p95']} ms")
        for phase, w in (s5.get("wait_split_ms") or {}).items():
            adm, dlv = w["admission"], w["delivery"]
            add(
                "5 noisy neighbour",
                f"A's wait split, {phase}: admission P50 / P95; delivery P50 / P95; direct",
                f"{adm['p50']} / {adm['p95']} ms; {dlv['p50']} / {dlv['p95']} ms; "
                + ("n/a" if w["admitted_directly"] is None else f"{w['admitted_directly']:.0%}"),
            )
    s6 = results.get("s6") or {}
    for name, phase in (("SSE", s6), ("WebSocket", s6.get("websocket"))):
        if not phase or "delivery_ms" not in phase:
            continue
        d = phase["delivery_ms"]
        add("6 streams", f"{name}: delivery P50 / P99", f"{d['p50']} / {d['p99']} ms")
        fifths = " · ".join(f"{f['p50']:g}/{f['p99']:g}" for f in phase["delivery_ms_by_fifth"])
        add("6 streams", f"{name}: P50/P99 by fifth of the run, early → late", f"{fifths} ms")
        rss = phase["web_rss_mb"]
        add(
            "6 streams",
            f"{name}: web RSS before / peak",
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


# --- CPU per process kind ------------------------------------------------------------------

# Columns of the CPU table, in this order; a kind no measurement had is left out.
CPU_KINDS = [
    ("web", "web"),
    ("scheduler", "scheduler"),
    ("llm", "llm pool"),
    ("tool", "tool pool"),
    ("retrieval", "retrieval pool"),
    ("gunicorn", "gunicorn"),
    ("celery_raw", "raw Celery"),
    ("dbos", "DBOS"),
    ("postgresql", "PostgreSQL"),
    ("rabbitmq", "RabbitMQ"),
    ("redis", "Redis"),
    ("bench", "bench (clients)"),
    ("total", "total"),
]


def cpu_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): CPU ms per unit of each process kind, one row per measurement."""
    measured = []
    for key, title in SCENARIOS:
        for name, cpu in ((results.get(key) or {}).get("cpu") or {}).items():
            if cpu.get("units"):
                measured.append((title.split(". ", 1)[0] + " " + name, cpu))
    kinds = [(k, label) for k, label in CPU_KINDS if any(k in c["ms"] for _, c in measured)]
    header = ["measurement", "per", *[label for _, label in kinds]]
    rows = []
    for name, cpu in measured:
        values = [_ms(cpu["ms"].get(k)) for k, _ in kinds]
        rows.append([name, f"{cpu['unit']} (of {cpu['units']:,})", *values])
    return header, rows


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def text_cpu(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(w) if i > 1 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in [header, *rows]
    ]
    return "CPU ms per unit, by process kind\n" + "\n".join(lines)


def markdown_cpu(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- files ---------------------------------------------------------------------------------


def write(outdir: Path, run: dict[str, Any]) -> tuple[str, str]:
    """Write results.json and report.md; returns (text table, markdown targets)."""
    results = run["scenarios"]
    run["targets"] = targets(results)
    rows = table_rows(results)
    (outdir / "results.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
    (outdir / "report.md").write_text(_markdown(run, rows))
    table = text_table(rows)
    cpu = text_cpu(*cpu_rows(results))
    return (f"{table}\n\n{cpu}" if cpu else table), markdown_targets(run["targets"])


def _markdown(run: dict[str, Any], rows) -> str:
    m = run["machine"]
    parts = [
        f"# Switchyard benchmark, {run['started']}",
        "",
        f"Mode: **{run['mode']}**, {run['duration_s']:.0f} s. Machine: {m['cores']} cores "
        f"({m['cpu']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}; Python {m['python']}, "
        f"Django {m.get('Django')}, Celery {m.get('celery')}, kombu {m.get('kombu')}, daphne "
        f"{m.get('daphne')}, channels {m.get('channels')}, gunicorn {m.get('gunicorn')}, "
        f"DBOS Transact {m.get('dbos')}; "
        f"PostgreSQL {m.get('postgresql')} (max_connections {m.get('postgresql_max_connections')}),"
        f" RabbitMQ {m.get('rabbitmq')}, Redis {m.get('redis')}. PostgreSQL round trip "
        f"{m.get('pg_round_trip_ms_p50')} ms, durable commit {m.get('pg_durable_commit_ms_p50')} "
        f"ms (P90 {m.get('pg_durable_commit_ms_p90')}). Load average at start "
        f"{m['load_average_at_start']}, at end {run.get('load_average_at_end')} (other work on "
        "the machine shows here).",
        "",
        "Every process (web, scheduler, workers, the baselines, the load generators) shares "
        "these cores with PostgreSQL, RabbitMQ and Redis. Latencies are nearest-rank "
        "percentiles over each scenario's samples; ratios compare figures of this run.",
        "",
        "## Results",
        "",
        markdown_table(rows),
        "",
        "## CPU per step by process kind",
        "",
        "CPU milliseconds (user + system, whole process trees, from /proc) each kind of "
        "process spent per unit of work, over each measurement: the steps it completed (or "
        "the submissions, or the workflows). PostgreSQL, RabbitMQ and Redis are the whole "
        "servers, shared with whatever else runs; idle kinds show what they cost idling.",
        "",
        markdown_cpu(*cpu_rows(run["scenarios"])),
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
