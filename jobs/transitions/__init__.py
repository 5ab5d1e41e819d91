"""The state transitions of runs and steps: their one owner.

Services (submission, approvals, operations), the scheduler and the workers change a run or
a step only through the public functions here:

- `txn`: `run_locked` (the run's transaction: its row lock, its event log, the statement that
  writes its changes), the cached definitions, `RunBusy` and `skips_busy_runs` (the
  scheduler's transitions never wait for a run's lock);
- `runs`: `run_insert` / `run_create` (a submission, a child run), `run_advance` (the engine's
  plan after every transition), `run_cancel`, `run_retry`, `step_fail_final`,
  `step_succeed_waiting` (a waiting step's wait ended well), `step_settle_from_child`;
- `steps`: admission (`steps_admit`, `step_hold`), the worker's `step_claim`, `step_complete`,
  `step_fail`, `step_start_child_run`, `step_park_waiting` (a claimed step that waits on a
  child run or people), the fencing of late reports (`step_fenced`), and
  recovery (`step_release_retry`, `step_expire_lease`, `step_redispatch`).

Their writes on the hot path are PL/pgSQL functions (`sql/functions.sql`, installed by
migrations, called through `sql`): one statement per claim, two in one transaction per
report, one per submission (docs/decisions.md, "The hot path in PL/pgSQL").
"""
