"""`make bench`: every scenario, one table, one report.

Usage: .venv/bin/python -m bench.run [--quick] [--only s1,s3] [--profile] [--keep-db]

Creates its own database (`switchyard_bench`, dropped and created afresh, dropped again at the
end unless --keep-db) and, for the DBOS baseline, a scratch one beside it
(`switchyard_bench_dbos`, always dropped), starts every process it needs with a private queue
prefix, runs the scenarios, stops everything it started (also on Ctrl-C, SIGTERM or an error),
and writes bench/results/<YYYYmmdd-HHMMSS>/ (report.md, results.json, a PNG per scenario, the
processes' logs) with bench/results/latest pointing at it. --profile also records py-spy
profiles of the processes while scenarios measure (py-spy must be installed in the venv).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from bench.params import FULL, QUICK  # noqa: E402

RESULTS = ROOT / "bench" / "results"

# The order scenarios run in (each keeps its number): the synchronous baseline first (its 40
# threads hold 40 of the bench database's connections; Switchyard's processes only boot and
# idle beside it), the scenarios that need the workers next, the API-only scenarios last.
ORDER = ["s1", "s3", "s4", "s5", "s6", "s2", "s7"]


def _scenario(key: str):
    from bench.scenarios import growth, motivating, noisy, overhead, streams, submission, throughput

    return {
        "s1": motivating,
        "s2": submission,
        "s3": overhead,
        "s4": throughput,
        "s5": noisy,
        "s6": streams,
        "s7": growth,
    }[key]


def _environment(params) -> dict[str, str]:
    """Settings of every Switchyard process (and of this one, which runs cycles in S7)."""
    return {
        "DEBUG": "false",
        # Production settings name their provider; the bench measures the simulated one.
        "SWITCHYARD_LLM_DEFAULT_PROVIDER": "simulated",
        "LOG_LEVEL": "WARNING",
        "DATABASE_CONN_MAX_AGE": "60",
        "SWITCHYARD_SCHEDULER_POLL_S": "1.0",
        "SWITCHYARD_DISPATCH_STALE_S": "30",
        "SWITCHYARD_LEASE_GRACE_S": "10",
        "SWITCHYARD_POOL_CAPACITY": params.deployment.pool_capacity(),
    }


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every scenario, smaller (≤ 2 min)")
    parser.add_argument("--only", default="", help="comma-separated scenarios, e.g. s1,s3")
    parser.add_argument("--profile", action="store_true", help="py-spy profiles of processes")
    parser.add_argument("--keep-db", action="store_true", help="keep switchyard_bench after")
    args = parser.parse_args()
    params = QUICK if args.quick else FULL
    chosen = [key for key in ORDER if not args.only or key in args.only.split(",")]

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    started_at = time.monotonic()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = RESULTS / stamp
    workdir = outdir / "logs"
    workdir.mkdir(parents=True, exist_ok=True)
    files = harness.raise_file_limit(16_384)
    environment = _environment(params)
    os.environ.update(environment)
    # DEBUG off requires a SECRET_KEY: one for this run, shared by every process through the
    # environment and kept out of the report (which records `environment`).
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    prefix = harness.new_prefix()
    print(f"bench: {'quick' if args.quick else 'full'} run → {outdir.relative_to(ROOT)}")
    print(f"bench: database {harness.bench_database()}, queue prefix {prefix!r}, files {files}")
    harness.bootstrap(prefix, connection_limit=params.deployment.db_connection_limit)
    print(f"bench: database ready in {time.monotonic() - started_at:.0f} s", flush=True)

    from bench import report
    from bench.context import Bench

    run: dict = {
        "started": report.now_iso(),
        "mode": "quick" if args.quick else "full",
        "revision": report.git_free_revision(),
        "machine": report.machine(),
        "params": params.as_dict(),
        "environment": environment,
        "scenarios": {},
    }
    cluster = harness.make_cluster(workdir, prefix, **environment)
    bench = Bench(
        params=params,
        cluster=cluster,
        outdir=outdir,
        workdir=workdir,
        profile=args.profile,
        scenarios=chosen,
    )
    try:
        for key in chosen:
            t0 = time.monotonic()
            print(f"bench: {key} …", flush=True)
            try:
                run["scenarios"][key] = _scenario(key).run(bench)
            except Exception:  # noqa: BLE001 - one failed scenario must not lose the others
                run["scenarios"][key] = {"error": traceback.format_exc()}
                print(traceback.format_exc(), file=sys.stderr)
                bench.stop_switchyard()
                bench.stop_web()
                bench.stop_dbos_workers()
                _reset_quietly(bench)
            run["scenarios"][key]["duration_s"] = round(time.monotonic() - t0, 1)
            print(f"bench: {key} done in {time.monotonic() - t0:.0f} s", flush=True)
    finally:
        cluster.stop_all()
        _quietly(bench.close_dbos)
        run["duration_s"] = time.monotonic() - started_at
        run["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        run["database_probe_at_end"] = report.database_probe()
        run["profiles"] = bench.profiles
        table, _ = report.write(outdir, run)
        report.update_latest(RESULTS, outdir)
        if not args.keep_db:
            harness.drop_database()
    print()
    print(table)
    print()
    for target in run["targets"]:
        state = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        gap = f" ({target['gap']})" if target["gap"] else ""
        print(f"{state:>6}  {target['target']}: {target['measured']}{gap}")
    print()
    print(f"bench: {run['duration_s']:.0f} s; report {outdir.relative_to(ROOT)}/report.md")
    return 1 if any("error" in r for r in run["scenarios"].values()) else 0


def _reset_quietly(bench) -> None:
    _quietly(bench.reset_runs)


def _quietly(action) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001 - best effort: between scenarios, or cleaning up
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
