"""The durable-execution baseline: DBOS Transact on the same PostgreSQL, in processes of its own.

Raw Celery is the floor (no checkpoint at all); DBOS Transact is a library that, like
Switchyard, checkpoints every workflow and every step in PostgreSQL, so it is the nearest
like-for-like: what a durable step costs when the state machine is a library call in the
worker instead of an engine with a scheduler and a broker.

- `bench.dbos.chain(steps)`: a workflow of `steps` no-op steps, one after another. Each step's
  outcome is one checkpoint (a row of `dbos.operation_outputs`); the workflow adds a row at
  enqueue, a claim by the dequeuing worker and its outcome.
- The worker: `python -m bench.dbos_baseline` boots, waits for SIGUSR1, then launches DBOS on
  the bench's scratch system database (`DBOS_SYSTEM_DATABASE_URL`), registers the bench's
  queue and dequeues from it until SIGTERM. The bench starts `Deployment.dbos_processes` of
  them.
- `Client` (the bench's process): enqueues through DBOS's own client (`DBOSClient`), in one
  transaction for a backlog, and reads the timings from DBOS's own tables
  (`workflow_status.created_at` → `completed_at`, `operation_outputs.completed_at_epoch_ms`).

Configured as DBOS's documentation recommends for throughput (the values are in
`bench.params.Deployment`, the reasons in docs/performance.md): a per-process
`worker_concurrency` and no global concurrency (which makes the dequeue a `READ COMMITTED`
`SKIP LOCKED` claim instead of a serialisable one), a unique `executor_id` per process, an
executor thread pool and a system-database pool sized to that concurrency, and a short queue
polling interval (the default, 1 s, would bound a queue to `worker_concurrency` workflows per
second per process).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
import uuid
from typing import Any

APP = "switchyard_bench"
QUEUE = "bench"
CHAIN = "bench.chain"
BOOTED = "bench-dbos: booted"
READY = "bench-dbos: ready"


def database_url(name: str, driver: str = "postgresql") -> str:
    return f"{driver}://postgres@127.0.0.1:5432/{name}"


# --- the worker ------------------------------------------------------------------------------


def _register_workflows():
    from dbos import DBOS

    @DBOS.step(name="bench.noop")
    def noop() -> None:
        return None

    @DBOS.workflow(name=CHAIN)
    def chain(steps: int) -> int:
        for _ in range(steps):
            noop()
        return steps

    return chain


def worker(args: argparse.Namespace) -> None:
    """Import DBOS and the workflows (most of a boot), print BOOTED, wait for SIGUSR1, then
    launch DBOS (connect, migrate, register the queue: it polls from then on), print READY
    and run until SIGTERM. The bench boots the workers early, while nothing is measured, and
    launches them when DBOS is measured, so that their polling never runs beside another
    measurement."""
    go, stop = threading.Event(), threading.Event()

    def on_stop(*_) -> None:
        stop.set()
        go.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_stop)
    signal.signal(signal.SIGUSR1, lambda *_: go.set())

    from dbos import DBOS, DBOSConfig

    _register_workflows()
    print(BOOTED, flush=True)
    go.wait()
    if stop.is_set():
        return
    config: DBOSConfig = {
        "name": APP,
        "system_database_url": os.environ["DBOS_SYSTEM_DATABASE_URL"],
        # worker_concurrency is counted per executor_id: each process needs its own.
        "executor_id": args.executor_id,
        "application_version": "bench",
        "sys_db_pool_size": args.pool_size,
        "max_executor_threads": args.threads,
        "log_level": "WARNING",
        "run_admin_server": False,
    }
    DBOS(config=config)
    DBOS.launch()
    DBOS.register_queue(
        QUEUE,
        worker_concurrency=args.worker_concurrency,
        polling_interval_sec=args.polling_interval_s,
        on_conflict="always_update",
    )
    print(READY, flush=True)
    stop.wait()
    DBOS.destroy()


# --- the bench's side ------------------------------------------------------------------------


class Client:
    """Enqueues the bench's workflows and reads their timings from DBOS's tables."""

    def __init__(self, database: str) -> None:
        import sqlalchemy as sa
        from dbos import DBOSClient

        self.engine = sa.create_engine(
            database_url(database, "postgresql+psycopg"), pool_size=2, max_overflow=0
        )
        self.client = DBOSClient(system_database_engine=self.engine, application_name=APP)

    def close(self) -> None:
        self.client.destroy()
        self.engine.dispose()

    def enqueue(self, batch: str, count: int, steps: int) -> None:
        """`count` chains of `steps` steps, ids `<batch>-<n>`, all visible to the workers at
        once (one transaction), as a released backlog.

        The first is enqueued by DBOS's client; the others are copies of its rows in SQL
        (`INSERT … SELECT generate_series`), as `bench.seed` copies Switchyard's backlogs: one
        client call per workflow would take the bench longer than the measurement.
        """
        import sqlalchemy as sa

        template = f"{batch}-0"
        with self.engine.begin() as conn:
            self.client.enqueue_in_transaction(
                conn,
                {"queue_name": QUEUE, "workflow_name": CHAIN, "workflow_id": template},
                steps,
            )
            if count < 2:
                return
            for table in ("workflow_status", "workflow_input"):
                columns = [
                    row[0]
                    for row in conn.execute(
                        sa.text(
                            "SELECT column_name FROM information_schema.columns WHERE "
                            "table_schema = 'dbos' AND table_name = :table "
                            "ORDER BY ordinal_position"
                        ),
                        {"table": table},
                    )
                ]
                select = [
                    f"t.{c}" if c != "workflow_uuid" else ":batch || '-' || n" for c in columns
                ]
                conn.execute(
                    sa.text(
                        f"INSERT INTO dbos.{table} ({', '.join(columns)}) "
                        f"SELECT {', '.join(select)} FROM dbos.{table} t, "
                        "generate_series(1, :copies) n WHERE t.workflow_uuid = :template"
                    ),
                    {"batch": batch, "copies": count - 1, "template": template},
                )

    def _scalar_rows(self, sql: str, **params: Any) -> list[Any]:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params).fetchall())

    def finished(self, batch: str) -> int:
        rows = self._scalar_rows(
            "SELECT count(*) FROM dbos.workflow_status WHERE workflow_uuid LIKE :prefix "
            "AND status IN ('SUCCESS', 'ERROR')",
            prefix=f"{batch}-%",
        )
        return rows[0][0]

    def failed(self, batch: str) -> int:
        rows = self._scalar_rows(
            "SELECT count(*) FROM dbos.workflow_status WHERE workflow_uuid LIKE :prefix "
            "AND status <> 'SUCCESS'",
            prefix=f"{batch}-%",
        )
        return rows[0][0]

    def wait(self, batch: str, count: int, timeout_s: float, poll_s: float = 0.01) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.finished(batch) >= count:
                return True
            time.sleep(poll_s)
        return False

    def walls_s(self, batch: str) -> list[float]:
        """Each finished workflow's enqueue → outcome, in seconds (the tables keep ms)."""
        rows = self._scalar_rows(
            "SELECT completed_at - created_at FROM dbos.workflow_status "
            "WHERE workflow_uuid LIKE :prefix AND status = 'SUCCESS' ORDER BY created_at",
            prefix=f"{batch}-%",
        )
        return [row[0] / 1000 for row in rows]

    def step_times(self, batch: str) -> list[float]:
        """When each step of the batch checkpointed its outcome (unix seconds)."""
        rows = self._scalar_rows(
            "SELECT completed_at_epoch_ms FROM dbos.operation_outputs "
            "WHERE workflow_uuid LIKE :prefix AND completed_at_epoch_ms IS NOT NULL",
            prefix=f"{batch}-%",
        )
        return [row[0] / 1000 for row in rows]

    def cancel_rest(self, batch: str) -> None:
        """Drop what a measurement that ran out of time left in the queue."""
        self._execute(
            "UPDATE dbos.workflow_status SET status = 'CANCELLED' WHERE workflow_uuid LIKE "
            ":prefix AND status = 'ENQUEUED'",
            prefix=f"{batch}-%",
        )

    def _execute(self, sql: str, **params: Any) -> None:
        import sqlalchemy as sa

        with self.engine.begin() as conn:
            conn.execute(sa.text(sql), params)


def new_batch(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def main() -> None:
    parser = argparse.ArgumentParser(description="A DBOS worker process of the bench.")
    parser.add_argument("--executor-id", required=True)
    parser.add_argument("--worker-concurrency", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--pool-size", type=int, required=True)
    parser.add_argument("--polling-interval-s", type=float, required=True)
    worker(parser.parse_args())


if __name__ == "__main__":
    main()
