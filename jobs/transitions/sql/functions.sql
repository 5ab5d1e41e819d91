-- The hot path's transitions as PL/pgSQL functions: one round trip each.
--
-- Installed (CREATE OR REPLACE) by the migration that follows any change of this file; the
-- Python side (jobs/transitions/sql.py) calls them and owns every decision that needs the
-- workflow's definition (the engine runs in Python and hands `switchyard_run_apply` the
-- rows to write). Every function takes the run's row lock first, then step rows, as every
-- transition does.

-- Append events to a run's log: gapless `seq` from the run's `next_seq`.
-- Call holding the run's row lock. `p_events` is a JSON array of
-- {"type", "step_id", "map_index", "data"}; returns the stored events as the live payloads
-- (`jobs.events.event_payload`).
CREATE OR REPLACE FUNCTION switchyard_log_append(p_run bigint, p_public_id uuid, p_events jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_first integer;
    v_count integer := jsonb_array_length(coalesce(p_events, '[]'::jsonb));
    v_now timestamptz := clock_timestamp();
BEGIN
    IF v_count = 0 THEN
        RETURN '[]'::jsonb;
    END IF;
    UPDATE jobs_run SET next_seq = next_seq + v_count WHERE id = p_run
        RETURNING next_seq - v_count INTO v_first;
    INSERT INTO jobs_event (run_id, seq, type, step_id, map_index, data, created_at)
    SELECT p_run, v_first + e.n - 1, e.item->>'type', coalesce(e.item->>'step_id', ''),
           (e.item->>'map_index')::integer, coalesce(e.item->'data', '{}'::jsonb), v_now
    FROM jsonb_array_elements(p_events) WITH ORDINALITY AS e(item, n);
    RETURN (
        SELECT jsonb_agg(
            jsonb_strip_nulls(jsonb_build_object(
                'run', p_public_id::text,
                'seq', v_first + e.n - 1,
                'type', e.item->>'type',
                'at', to_char(v_now AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'),
                'data', coalesce(e.item->'data', '{}'::jsonb),
                'step', nullif(e.item->>'step_id', ''),
                'map_index', CASE WHEN coalesce(e.item->>'step_id', '') <> ''
                                  THEN e.item->'map_index' END
            )) || jsonb_build_object('data', coalesce(e.item->'data', '{}'::jsonb))
            ORDER BY e.n)
        FROM jsonb_array_elements(p_events) WITH ORDINALITY AS e(item, n)
    );
END;
$$;


-- The claim: queued → running for the holder of the current dispatch token, the attempt
-- opened, the run started, `step.started` (and `run.started`) appended, the scheduler woken if
-- steps wait for admission. One statement.
-- Outcomes: "claimed" (with the claim), "stale" (drop the message: another token, or the
-- step is no longer queued), "lost" (the step is `running` under this very token: its worker
-- died; the caller records the lost attempt and claims again).
CREATE OR REPLACE FUNCTION switchyard_step_claim(
    p_step bigint, p_token uuid, p_worker text, p_grace_s double precision
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_run_id bigint;
    r jobs_run%ROWTYPE;
    s jobs_steprun%ROWTYPE;
    v_now timestamptz := clock_timestamp();
    v_events jsonb := '[]'::jsonb;
BEGIN
    SELECT run_id INTO v_run_id FROM jobs_steprun WHERE id = p_step;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'stale');
    END IF;
    SELECT * INTO r FROM jobs_run WHERE id = v_run_id FOR UPDATE;
    SELECT * INTO s FROM jobs_steprun WHERE id = p_step FOR UPDATE;
    IF s.dispatch_token IS DISTINCT FROM p_token THEN
        RETURN jsonb_build_object('outcome', 'stale');
    ELSIF s.status = 'running' THEN
        RETURN jsonb_build_object('outcome', 'lost', 'run_pk', r.id);
    ELSIF s.status <> 'queued' THEN
        RETURN jsonb_build_object('outcome', 'stale');
    END IF;

    UPDATE jobs_steprun
       SET attempt = attempt + 1, status = 'running', started_at = v_now, worker = p_worker,
           lease_expires_at = v_now + make_interval(secs => timeout_s + p_grace_s)
     WHERE id = p_step
    RETURNING * INTO s;
    INSERT INTO jobs_stepattempt (step_run_id, number, outcome, dispatch_token, worker, error,
                                  error_code, started_at)
    VALUES (s.id, s.attempt, 'running', p_token, p_worker, '', '', v_now);

    IF r.status = 'accepted' THEN
        UPDATE jobs_run SET status = 'running', started_at = v_now, updated_at = v_now
         WHERE id = r.id;
        v_events := v_events || jsonb_build_object('type', 'run.started', 'data', '{}'::jsonb);
    ELSIF r.status = 'waiting' THEN
        UPDATE jobs_run SET status = 'running', updated_at = v_now WHERE id = r.id;
        v_events := v_events || jsonb_build_object('type', 'run.running', 'data', '{}'::jsonb);
    END IF;
    v_events := v_events || jsonb_build_object(
        'type', 'step.started', 'step_id', s.step_id, 'map_index', s.map_index,
        'data', jsonb_build_object('attempt', s.attempt, 'worker', p_worker));
    RETURN jsonb_build_object(
        'outcome', 'claimed',
        -- A queued slot of this queue is free: the scheduler matters only if a step waits for
        -- admission. The caller wakes it after the commit (jobs/wakeups.py: a NOTIFY here
        -- would serialise this commit with every other notifying one).
        'wake', EXISTS (SELECT 1 FROM jobs_steprun WHERE status = 'ready'),
        'run_pk', r.id,
        'run_public_id', r.public_id,
        'tenant_id', r.tenant_id,
        'step_id', s.step_id,
        'map_index', s.map_index,
        'kind', s.kind,
        'attempt', s.attempt,
        'max_attempts', s.max_attempts,
        'workflow_version_id', r.workflow_version_id,
        'input', coalesce(s.input, '{}'::jsonb),
        'timeout_s', s.timeout_s,
        'started_at', s.started_at,
        'lease_expires_at', s.lease_expires_at,
        'events', switchyard_log_append(r.id, r.public_id, v_events)
    );
END;
$$;


-- A worker's report of one attempt: a compare-and-set on (step, dispatch token, attempt,
-- running). Accepted: the attempt closes with `p_outcome`, the step takes `p_status`
-- (succeeded with its output; retry_wait with its retry time; failed), its event is appended,
-- the LLM tokens it used are appended to the tenant's usage. `p_error` is the attempt's error,
-- `p_step_error` the step's (a final failure says how many attempts it took). When the step ended, the run's
-- steps are returned for the engine (which the caller runs, then `switchyard_run_apply`).
-- Refused (a late report: the step was taken over): the attempt is marked refused and, while
-- the run is open, `step.result_refused` is appended.
-- Call inside a transaction: the run's lock is held until the caller's apply and commit.
CREATE OR REPLACE FUNCTION switchyard_step_report(
    p_step bigint, p_run bigint, p_token uuid, p_attempt integer, p_reported text,
    p_status text, p_outcome text, p_output jsonb, p_error text, p_step_error text, p_code text,
    p_retry_at timestamptz, p_event jsonb, p_llm_tokens bigint, p_day date
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    r jobs_run%ROWTYPE;
    s jobs_steprun%ROWTYPE;
    v_now timestamptz := clock_timestamp();
    v_duration_ms double precision;
    v_data jsonb;
BEGIN
    SELECT * INTO r FROM jobs_run WHERE id = p_run FOR UPDATE;
    SELECT * INTO s FROM jobs_steprun WHERE id = p_step AND run_id = p_run FOR UPDATE;
    IF NOT FOUND OR s.status <> 'running' OR s.dispatch_token IS DISTINCT FROM p_token
       OR s.attempt <> p_attempt THEN
        UPDATE jobs_stepattempt SET outcome = 'refused'
         WHERE step_run_id = p_step AND number = p_attempt AND outcome = 'lost';
        RETURN jsonb_build_object(
            'outcome', 'refused',
            'status', s.status,
            'attempt', s.attempt,
            'events', CASE WHEN r.status IN ('succeeded', 'failed', 'cancelled')
                           OR s.id IS NULL THEN '[]'::jsonb
                      ELSE switchyard_log_append(r.id, r.public_id, jsonb_build_array(
                          jsonb_build_object(
                              'type', 'step.result_refused', 'step_id', s.step_id,
                              'map_index', s.map_index,
                              'data', jsonb_build_object(
                                  'attempt', p_attempt, 'reported', p_reported,
                                  'reason', format('the step is now %s at attempt %s',
                                                   s.status, s.attempt)))))
                      END);
    END IF;

    v_duration_ms := extract(epoch FROM v_now - s.started_at) * 1000;
    UPDATE jobs_stepattempt
       SET outcome = p_outcome, error = p_error, error_code = p_code, finished_at = v_now,
           duration_ms = extract(epoch FROM v_now - started_at) * 1000
     WHERE step_run_id = p_step AND number = p_attempt;
    UPDATE jobs_steprun
       SET status = p_status,
           output = CASE WHEN p_status = 'succeeded' THEN p_output ELSE output END,
           error = p_step_error, error_code = p_code,
           retry_at = p_retry_at,
           finished_at = CASE WHEN p_status IN ('succeeded', 'failed') THEN v_now
                              ELSE finished_at END,
           lease_expires_at = NULL
     WHERE id = p_step;
    IF p_llm_tokens > 0 THEN
        INSERT INTO tenants_tenanttokenuse (tenant_id, day, llm_tokens)
        VALUES (s.tenant_id, p_day, p_llm_tokens);
    END IF;
    v_data := coalesce(p_event->'data', '{}'::jsonb);
    IF p_status = 'succeeded' THEN
        v_data := v_data || jsonb_build_object('duration_ms', round(v_duration_ms::numeric, 1));
    END IF;
    RETURN jsonb_build_object(
        'outcome', 'accepted',
        'run', to_jsonb(r) || jsonb_build_object('next_seq', r.next_seq + 1),
        'events', switchyard_log_append(r.id, r.public_id, jsonb_build_array(jsonb_build_object(
            'type', p_event->>'type', 'step_id', s.step_id, 'map_index', s.map_index,
            'data', v_data))),
        'steps', CASE WHEN p_status IN ('succeeded', 'failed') THEN (
            SELECT jsonb_agg(jsonb_build_array(
                       step_id, map_index, status, output, nullif(error, ''), kind, id)
                   ORDER BY id)
            FROM jobs_steprun WHERE run_id = p_run) END
    );
END;
$$;


-- ready → queued for the given steps, with fresh dispatch tokens and `step.queued` events:
-- the one writer of this transition (the scheduler's admission and the direct admission of
-- `switchyard_run_apply` both call it), which advances the admission epoch when it admits. Runs are locked in id order, SKIP LOCKED: a run that
-- another transaction holds (a worker reporting, or a stalled one) is not waited for, and its
-- steps stay ready for the next cycle (a run this transaction holds is not skipped).
-- Returns {"dispatches": [{"id", "token", "queue", "lane", "timeout_s", "tenant_id"}],
--          "events": [{"run": public id, "events": [...]}]}.
CREATE OR REPLACE FUNCTION switchyard_steps_admit(p_ids bigint[])
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_run record;
    v_dispatches jsonb := '[]'::jsonb;
    v_events jsonb := '[]'::jsonb;
    v_queued jsonb;
BEGIN
    FOR v_run IN
        SELECT id, public_id FROM jobs_run
         WHERE id IN (SELECT run_id FROM jobs_steprun WHERE id = ANY(p_ids) AND status = 'ready')
         ORDER BY id
           FOR UPDATE SKIP LOCKED
    LOOP
        WITH queued AS (
            UPDATE jobs_steprun
               SET status = 'queued', dispatched_at = v_now,
                   dispatch_token = gen_random_uuid(), held_reason = ''
             WHERE id = ANY(p_ids) AND run_id = v_run.id AND status = 'ready'
            RETURNING id, dispatch_token, queue, lane, timeout_s, tenant_id, step_id, map_index
        )
        SELECT jsonb_agg(jsonb_build_object(
                   'id', id, 'token', dispatch_token, 'queue', queue, 'lane', lane,
                   'timeout_s', timeout_s, 'tenant_id', tenant_id,
                   'step_id', step_id, 'map_index', map_index) ORDER BY id)
          INTO v_queued FROM queued;
        IF v_queued IS NULL THEN
            CONTINUE;
        END IF;
        v_dispatches := v_dispatches || v_queued;
        v_events := v_events || jsonb_build_array(jsonb_build_object(
            'run', v_run.public_id,
            'events', switchyard_log_append(v_run.id, v_run.public_id, (
                SELECT jsonb_agg(jsonb_build_object(
                           'type', 'step.queued', 'step_id', q->>'step_id',
                           'map_index', q->'map_index',
                           'data', jsonb_build_object('queue', q->>'queue')))
                  FROM jsonb_array_elements(v_queued) q))));
    END LOOP;
    IF jsonb_array_length(v_dispatches) > 0 THEN
        -- A scheduler that decided without the admission lock decides again (jobs/scheduler.py).
        PERFORM nextval('switchyard_admission_epoch');
    END IF;
    RETURN jsonb_build_object('dispatches', v_dispatches, 'events', v_events);
END;
$$;


-- Whether a tenant other than `p_tenant` has a ready step in `p_queue` (two index probes, so
-- that a large backlog of `p_tenant`'s own is not read).
CREATE OR REPLACE FUNCTION switchyard_others_ready(p_queue text, p_tenant bigint)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM jobs_steprun WHERE status = 'ready' AND queue = p_queue
                      AND tenant_id < p_tenant)
        OR EXISTS (SELECT 1 FROM jobs_steprun WHERE status = 'ready' AND queue = p_queue
                      AND tenant_id > p_tenant);
$$;


-- The tenant's next ready steps of `p_queue` in the scheduler's order (jobs/admission.py), at
-- most `p_limit`: first a lower lane whose share of the queue's in-flight steps is below its
-- reserved minimum (`p_min_share`), as many as bring it to that share; then its lanes by
-- urgency. Within a lane, steps of runs already started (and child runs) first, then those of
-- runs not started (top-level runs still `accepted`) while the tenant may start another run
-- (`p_starts` more than the runs in `p_started`, those this admission starts already), each
-- by age (`_concrete_steps`). A lane is read up to its `4 × p_limit` oldest ready steps, so
-- that a backlog of thousands costs no more than a few dozen rows; a step beyond them is left
-- to the scheduler. Returns the steps and the runs started.
CREATE OR REPLACE FUNCTION switchyard_tenant_next_steps(
    p_tenant bigint, p_queue text, p_limit integer, p_starts integer, p_started bigint[],
    p_min_share jsonb, OUT ids bigint[], OUT started bigint[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_lane text;
    v_take integer;
    v_total integer;
    v_step record;
    v_passes text[] := '{}';
    v_takes integer[] := '{}';
    i integer;
BEGIN
    ids := '{}';
    started := coalesce(p_started, '{}');
    SELECT count(*) INTO v_total FROM jobs_steprun
     WHERE status IN ('queued', 'running') AND kind <> 'map' AND queue = p_queue;
    FOREACH v_lane IN ARRAY ARRAY['standard', 'batch'] LOOP
        SELECT ceil(coalesce((p_min_share->>v_lane)::double precision, 0) * (v_total + 1)
                    - count(*))::integer INTO v_take
          FROM jobs_steprun
         WHERE status IN ('queued', 'running') AND kind <> 'map' AND queue = p_queue
           AND lane = v_lane;
        IF v_take > 0 THEN
            v_passes := v_passes || v_lane;
            v_takes := v_takes || v_take;
        END IF;
    END LOOP;
    v_passes := v_passes || ARRAY['interactive', 'standard', 'batch'];
    v_takes := v_takes || ARRAY[p_limit, p_limit, p_limit];
    <<passes>>
    FOR i IN 1 .. array_length(v_passes, 1) LOOP
        v_take := v_takes[i];
        FOR v_step IN
            SELECT w.id, w.run_id, w.starts FROM (
                SELECT s.id, s.run_id, s.ready_at,
                       (ru.status = 'accepted' AND ru.parent_step_id IS NULL) AS starts
                  FROM jobs_steprun s JOIN jobs_run ru ON ru.id = s.run_id
                 WHERE s.status = 'ready' AND s.queue = p_queue AND s.tenant_id = p_tenant
                   AND s.lane = v_passes[i]
                 ORDER BY s.ready_at, s.id
                 LIMIT 4 * p_limit) w
             WHERE NOT w.id = ANY(ids)
             ORDER BY w.starts, w.ready_at, w.id
        LOOP
            EXIT WHEN v_take <= 0;
            IF v_step.starts AND NOT v_step.run_id = ANY(started) THEN
                -- The rest of the lane's list are steps of runs not started either.
                EXIT WHEN coalesce(array_length(started, 1), 0) >= p_starts;
                started := started || v_step.run_id;
            END IF;
            ids := ids || v_step.id;
            v_take := v_take - 1;
            EXIT passes WHEN array_length(ids, 1) >= p_limit;
        END LOOP;
    END LOOP;
END;
$$;


-- Where a tenant stands in the fair order of `p_queue` (jobs/admission.py `_next_fair`): the
-- weights of the active tenants (with ready or in-flight steps), its own in-flight steps, the
-- lowest load (in-flight per unit of weight) of the other tenants with ready steps (NULL: none
-- waits; a paused tenant's steps do not), and whether a lower lane of another tenant is below its minimum share (that lane is
-- served first).
CREATE OR REPLACE FUNCTION switchyard_fair_position(
    p_queue text, p_tenant bigint, p_lane text, p_adm jsonb,
    OUT weights double precision, OUT mine integer, OUT min_other double precision,
    OUT lane_first boolean)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    WITH RECURSIVE ready_bucket AS (
        (SELECT tenant_id, lane FROM jobs_steprun
          WHERE status = 'ready' AND queue = p_queue
          ORDER BY queue, tenant_id, lane LIMIT 1)
        UNION ALL
        SELECT nx.tenant_id, nx.lane FROM ready_bucket b, LATERAL (
            SELECT s.tenant_id, s.lane FROM jobs_steprun s
             WHERE s.status = 'ready' AND s.queue = p_queue
               AND (s.tenant_id, s.lane) > (b.tenant_id, b.lane)
             ORDER BY s.queue, s.tenant_id, s.lane LIMIT 1) nx
    ),
    -- A paused tenant's ready steps wait for nothing here (the scheduler skips them too).
    waiting AS (
        SELECT rb.tenant_id, rb.lane FROM ready_bucket rb
          JOIN tenants_tenant tt ON tt.id = rb.tenant_id
         WHERE tt.is_active
    ),
    flight AS (
        SELECT tenant_id, lane, count(*) AS n FROM jobs_steprun
         WHERE status IN ('queued', 'running') AND kind <> 'map'
           AND queue = p_queue
         GROUP BY tenant_id, lane
    ),
    per_tenant AS (
        SELECT tenant_id, sum(n) AS n FROM flight GROUP BY tenant_id
    ),
    active AS (
        SELECT tenant_id FROM waiting UNION SELECT tenant_id FROM per_tenant
    )
    SELECT
        (SELECT coalesce(sum(greatest(1, tt.weight)), 1)
           FROM active a JOIN tenants_tenant tt ON tt.id = a.tenant_id),
        coalesce((SELECT n FROM per_tenant WHERE tenant_id = p_tenant), 0),
        (SELECT min(coalesce(p.n, 0)::double precision / greatest(1, tt.weight))
           FROM (SELECT DISTINCT tenant_id FROM waiting) rb
           JOIN tenants_tenant tt ON tt.id = rb.tenant_id
           LEFT JOIN per_tenant p ON p.tenant_id = rb.tenant_id
          WHERE rb.tenant_id <> p_tenant),
        EXISTS (
            SELECT 1 FROM waiting rb
             WHERE rb.tenant_id <> p_tenant AND rb.lane <> p_lane
               AND rb.lane IN ('standard', 'batch')
               AND coalesce((SELECT sum(n) FROM flight f WHERE f.lane = rb.lane), 0)
                   < coalesce((p_adm->'lane_min_share'->>rb.lane)::double precision, 0)
                     * (coalesce((SELECT sum(n) FROM flight), 0) + 1))
      INTO weights, mine, min_other, lane_first;
END;
$$;


-- The admission lock for this transaction, waited for up to `p_wait_ms`; false when the wait
-- timed out (the lock stays with its holder).
CREATE OR REPLACE FUNCTION switchyard_admission_lock_wait(p_lock bigint, p_wait_ms integer)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_timeout text := current_setting('lock_timeout');
BEGIN
    BEGIN
        -- Undone with this block's subtransaction when the wait times out.
        PERFORM set_config('lock_timeout', p_wait_ms || 'ms', true);
        PERFORM pg_advisory_xact_lock(p_lock);
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
    PERFORM set_config('lock_timeout', v_timeout, true);
    RETURN true;
END;
$$;


-- Whether a direct admission in `p_queues` (of one tenant's steps: just made ready, or waiting
-- where its report freed a slot) is worth waiting for the admission lock: in one of the queues
-- there is room for the tenant (a place
-- short of the fair reserve, or one in it while the tenant is below its fair share), and
-- either no other tenant's step waits there or the fair policy would pick this tenant first.
-- A hint read without the lock; the admission itself checks everything again holding it.
CREATE OR REPLACE FUNCTION switchyard_admission_worth_waiting(
    p_queues text[], p_tenant bigint, p_weight integer, p_lane text, p_adm jsonb)
RETURNS boolean LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_queue text;
    v_queued integer;
    v_max_queued integer;
    v_open integer;
    v_others boolean;
    p record;
BEGIN
    FOREACH v_queue IN ARRAY p_queues LOOP
        v_max_queued := coalesce((p_adm->'queues'->v_queue->>'max_queued')::integer, 0);
        v_open := v_max_queued - coalesce((p_adm->'queues'->v_queue->>'reserve')::integer, 0);
        SELECT count(*) INTO v_queued FROM jobs_steprun
         WHERE status = 'queued' AND queue = v_queue;
        CONTINUE WHEN v_queued >= v_max_queued;
        v_others := switchyard_others_ready(v_queue, p_tenant);
        IF NOT v_others AND v_queued < v_open THEN
            RETURN true;
        END IF;
        CONTINUE WHEN v_others AND NOT coalesce((p_adm->>'fair')::boolean, false);
        SELECT * INTO p FROM switchyard_fair_position(v_queue, p_tenant, p_lane, p_adm);
        v_others := v_others AND p.min_other IS NOT NULL;  -- paused tenants' steps only
        CONTINUE WHEN v_others AND (p.lane_first
                                    OR p.mine::double precision / greatest(1, p_weight)
                                       >= p.min_other);
        IF v_queued < v_open
           OR p.mine < coalesce((p_adm->'queues'->v_queue->>'capacity')::integer, 0)
                       * greatest(1, p_weight) / p.weights THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END;
$$;


-- What a run's transaction writes after the engine ran, in one statement: new step rows (a
-- map's items), step changes by key, the run's change, its events (gapless seq), then the
-- direct admission of the steps made ready (when nothing else waits in their queue, or the fair
-- policy would pick this tenant first, and the tenant's quotas allow; the same rules as
-- jobs/admission.py, which hands over the queues' room), and whether the scheduler should be woken (the caller wakes it after the commit).
--
-- p_plan: {
--   "new_steps": [{"step_id", "map_index", "kind", "queue", "max_attempts", "timeout_s"}],
--   "steps": [{"step_id", "map_index", "status", "input"?, "output"?, "error"?,
--              "ready": bool, "finish": bool}],
--   "run": {"status", "output"?, "error"?, "started": bool, "finished": bool} | null,
--   "events": [{"type", "step_id"?, "map_index"?, "data"}],
--   "admit": [[step_id, map_index], ...],          (steps made ready: direct admission)
--   "freed": [queue] | absent,                     (a worker slot freed: the tenant's next)
--   "admission": {"lock": int, "burst_s": float, "unheld_s": float, "fair": bool,
--                 "lane_min_share": {lane: float},
--                 "queues": {queue: {"max_queued": int, "reserve": int, "capacity": int}}}
--                | null,
--   "wake": "always" | "if_ready" | null
-- }
-- Returns {"dispatches": [{"id", "token", "queue", "lane", "timeout_s"}], "events": [...],
--          "wake": bool}.
CREATE OR REPLACE FUNCTION switchyard_run_apply(p_run bigint, p_plan jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    r jobs_run%ROWTYPE;
    t tenants_tenant%ROWTYPE;
    v_now timestamptz := clock_timestamp();
    v_events jsonb := coalesce(p_plan->'events', '[]'::jsonb);
    v_adm jsonb := p_plan->'admission';
    v_admit jsonb := coalesce(p_plan->'admit', '[]'::jsonb);
    v_admitted bigint[] := '{}';
    v_ready_ids bigint[];
    v_queue text;
    v_candidates bigint[];
    v_queued integer;
    v_in_flight integer;
    v_others boolean;
    v_max_queued integer;
    v_reserve integer;
    v_fair_n integer;
    v_below boolean;
    v_weights double precision;
    v_mine integer;
    v_min_other double precision;
    v_lane_first boolean;
    v_share double precision;
    v_level double precision;
    v_refilled_at timestamptz;
    v_spent double precision;
    v_llm bigint;
    v_active integer;
    v_unheld integer;
    v_tokens double precision;
    v_capacity double precision;
    v_room integer;
    v_n integer;
    v_dispatches jsonb := '[]'::jsonb;
    v_admission jsonb;
    v_logged jsonb;
    v_wake boolean := coalesce(p_plan->>'wake' = 'always', false);
    v_locked boolean := false;
    v_others_logged jsonb := '[]'::jsonb;
    v_started bigint[] := '{}';
    v_freed jsonb := coalesce(p_plan->'freed', '[]'::jsonb);
    v_queues text[];
BEGIN
    SELECT * INTO r FROM jobs_run WHERE id = p_run;  -- locked by the caller's transaction

    INSERT INTO jobs_steprun (run_id, tenant_id, lane, step_id, map_index, kind, queue, status,
                              attempt, max_attempts, timeout_s, error, error_code, worker,
                              held_reason, created_at)
    SELECT p_run, r.tenant_id, r.lane, n.step_id, n.map_index, n.kind, n.queue, 'pending', 0,
           n.max_attempts, n.timeout_s, '', '', '', '', v_now
    FROM jsonb_to_recordset(coalesce(p_plan->'new_steps', '[]'::jsonb))
         AS n(step_id text, map_index integer, kind text, queue text, max_attempts integer,
              timeout_s double precision);

    UPDATE jobs_steprun s
       SET status = u.status,
           input = CASE WHEN u.item ? 'input' THEN u.item->'input' ELSE s.input END,
           output = CASE WHEN u.item ? 'output' THEN u.item->'output' ELSE s.output END,
           error = CASE WHEN u.item ? 'error' THEN u.item->>'error' ELSE s.error END,
           ready_at = CASE WHEN u.ready THEN v_now ELSE s.ready_at END,
           started_at = CASE WHEN u.started THEN v_now ELSE s.started_at END,
           finished_at = CASE WHEN u.finish THEN v_now ELSE s.finished_at END,
           lease_expires_at = CASE WHEN u.finish THEN NULL ELSE s.lease_expires_at END
      FROM (SELECT e AS item, e->>'step_id' AS step_id, (e->>'map_index')::integer AS map_index,
                   e->>'status' AS status, coalesce((e->>'ready')::boolean, false) AS ready,
                   coalesce((e->>'started')::boolean, false) AS started,
                   coalesce((e->>'finish')::boolean, false) AS finish
              FROM jsonb_array_elements(coalesce(p_plan->'steps', '[]'::jsonb)) e) u
     WHERE s.run_id = p_run AND s.step_id = u.step_id
       AND s.map_index IS NOT DISTINCT FROM u.map_index;

    IF p_plan->'run' IS NOT NULL AND jsonb_typeof(p_plan->'run') = 'object' THEN
        UPDATE jobs_run
           SET status = p_plan->'run'->>'status',
               output = CASE WHEN p_plan->'run' ? 'output' THEN p_plan->'run'->'output'
                             ELSE output END,
               error = CASE WHEN p_plan->'run' ? 'error' THEN p_plan->'run'->>'error'
                            ELSE error END,
               started_at = CASE WHEN coalesce((p_plan->'run'->>'started')::boolean, false)
                                 THEN coalesce(started_at, v_now) ELSE started_at END,
               finished_at = CASE WHEN coalesce((p_plan->'run'->>'finished')::boolean, false)
                                  THEN v_now ELSE finished_at END,
               updated_at = v_now
         WHERE id = p_run
        RETURNING * INTO r;
    END IF;

    v_logged := switchyard_log_append(p_run, r.public_id, v_events);

    -- Direct admission (see jobs/admission.py for the rules).
    IF v_adm IS NOT NULL AND jsonb_typeof(v_adm) = 'object'
       AND (jsonb_array_length(v_admit) > 0 OR jsonb_array_length(v_freed) > 0) THEN
        SELECT array_agg(s.id ORDER BY s.id) INTO v_ready_ids
          FROM jobs_steprun s
          JOIN jsonb_array_elements(v_admit) k
            ON s.step_id = k->>0 AND s.map_index IS NOT DISTINCT FROM (k->>1)::integer
         WHERE s.run_id = p_run AND s.status = 'ready';
        -- The queues to admit in: those of the steps made ready, and that of a slot this
        -- transaction freed if the tenant has steps waiting there (its backlog takes the slot).
        SELECT array_agg(DISTINCT q ORDER BY q) INTO v_queues FROM (
            SELECT queue AS q FROM jobs_steprun WHERE id = ANY(coalesce(v_ready_ids, '{}'))
            UNION
            SELECT f FROM jsonb_array_elements_text(v_freed) f
             WHERE EXISTS (SELECT 1 FROM jobs_steprun WHERE status = 'ready' AND queue = f
                              AND tenant_id = r.tenant_id)) x;
        v_ready_ids := coalesce(v_ready_ids, '{}');
        SELECT * INTO t FROM tenants_tenant WHERE id = r.tenant_id;
        -- The admission lock: waited for (briefly) only when this tenant's steps would be
        -- admitted first; otherwise a scheduler cycle holding it admits them next.
        IF v_queues IS NOT NULL AND t.is_active THEN
            v_locked := pg_try_advisory_xact_lock((v_adm->>'lock')::bigint);
            -- Waited for only for steps made ready here (a step someone waits on); a freed
            -- slot's backlog only tries (the scheduler admits it otherwise), so that a flood's
            -- reports do not queue for the lock ahead of an interactive step.
            IF NOT v_locked AND coalesce((v_adm->>'lock_wait_ms')::integer, 0) > 0
               AND cardinality(v_ready_ids) > 0
               AND switchyard_admission_worth_waiting(
                       ARRAY(SELECT DISTINCT queue FROM jobs_steprun
                              WHERE id = ANY(v_ready_ids) ORDER BY queue),
                       r.tenant_id, t.weight, r.lane, v_adm) THEN
                v_locked := switchyard_admission_lock_wait((v_adm->>'lock')::bigint,
                                                           (v_adm->>'lock_wait_ms')::integer);
            END IF;
        END IF;
        IF v_locked THEN
            v_tokens := NULL;
            -- Runs that have not started start only while the tenant's active runs are fewer
            -- than its quota (a child run is part of an active tree and does not count).
            SELECT count(*) INTO v_active FROM jobs_run
             WHERE tenant_id = r.tenant_id AND status IN ('running', 'waiting');
            <<queues>>
            FOREACH v_queue IN ARRAY v_queues LOOP
                v_max_queued := coalesce((v_adm->'queues'->v_queue->>'max_queued')::integer, 0);
                -- The tenant's ready steps in the scheduler's order (its most urgent lane, then
                -- the oldest), its older ones before these, within its active-runs quota.
                SELECT ids, started INTO v_candidates, v_started
                  FROM switchyard_tenant_next_steps(r.tenant_id, v_queue,
                                                    greatest(v_max_queued, 1),
                                                    t.max_active_runs - v_active, v_started,
                                                    v_adm->'lane_min_share');
                CONTINUE queues WHEN coalesce(array_length(v_candidates, 1), 0) = 0;
                SELECT count(*) INTO v_queued FROM jobs_steprun
                 WHERE status = 'queued' AND queue = v_queue;
                SELECT count(*) INTO v_in_flight FROM jobs_steprun
                 WHERE status IN ('queued', 'running') AND kind <> 'map'
                   AND tenant_id = r.tenant_id;
                v_others := switchyard_others_ready(v_queue, r.tenant_id);
                v_reserve := coalesce((v_adm->'queues'->v_queue->>'reserve')::integer, 0);
                v_fair_n := NULL;
                v_share := NULL;
                v_below := true;
                IF v_others AND NOT coalesce((v_adm->>'fair')::boolean, false) THEN
                    CONTINUE queues;  -- FIFO: every step waits for the scheduler's order
                END IF;
                IF v_others
                   OR v_max_queued - v_queued - array_length(v_candidates, 1) < v_reserve THEN
                    -- Other tenants wait (or admitting would reach into the reserve): admit only
                    -- what the fair policy would pick first (jobs/admission.py `_next_fair`),
                    -- and the reserve only to a tenant below its fair share (`fair_reserve`).
                    SELECT * INTO v_weights, v_mine, v_min_other, v_lane_first
                      FROM switchyard_fair_position(v_queue, r.tenant_id, r.lane, v_adm);
                    -- Only paused tenants' steps wait: as if none did.
                    v_others := v_others AND v_min_other IS NOT NULL;
                    IF v_others THEN
                        IF v_lane_first
                           OR v_mine::double precision / greatest(1, t.weight) >= v_min_other THEN
                            CONTINUE queues;
                        END IF;
                        -- Picked while its load stays below every other waiting tenant's.
                        v_fair_n := ceil(v_min_other * greatest(1, t.weight) - v_mine)::integer;
                    END IF;
                    v_share := coalesce((v_adm->'queues'->v_queue->>'capacity')::integer, 0)
                               * greatest(1, t.weight) / v_weights;
                    v_below := v_mine < v_share;
                END IF;
                IF v_queue = 'steps.llm' THEN
                    SELECT coalesce((SELECT sum(llm_tokens) FROM tenants_tenantusageday
                                      WHERE tenant_id = r.tenant_id AND day = (v_now AT TIME ZONE 'UTC')::date), 0)
                         + coalesce((SELECT sum(llm_tokens) FROM tenants_tenanttokenuse
                                      WHERE tenant_id = r.tenant_id AND day = (v_now AT TIME ZONE 'UTC')::date), 0)
                      INTO v_llm;
                    IF v_llm >= t.llm_tokens_per_day THEN
                        CONTINUE queues;
                    END IF;
                END IF;
                IF v_tokens IS NULL THEN
                    SELECT step_tokens, refilled_at INTO v_level, v_refilled_at
                      FROM tenants_tenantthrottle WHERE tenant_id = r.tenant_id;
                    SELECT coalesce(sum(step_tokens), 0) INTO v_spent
                      FROM tenants_tenantthrottlespend WHERE tenant_id = r.tenant_id;
                    v_capacity := greatest(1.0,
                        t.steps_per_minute / 60.0 * (v_adm->>'burst_s')::double precision);
                    IF v_level IS NULL THEN
                        v_tokens := v_capacity;
                    ELSE
                        v_tokens := least(v_capacity, v_level + greatest(0,
                            extract(epoch FROM v_now - v_refilled_at)) * t.steps_per_minute / 60.0);
                    END IF;
                    v_tokens := v_tokens - v_spent;
                END IF;
                SELECT count(*) INTO v_unheld FROM jobs_steprun
                 WHERE status = 'running' AND kind <> 'map' AND queue = v_queue
                   AND timeout_s > (v_adm->>'unheld_s')::double precision;
                v_room := least(
                    v_max_queued - v_queued,
                    coalesce((v_adm->'queues'->v_queue->>'capacity')::integer, 0)
                        - v_unheld - v_queued);
                IF v_below AND v_share IS NOT NULL THEN
                    -- Into the reserve only while below its share.
                    v_room := least(v_room, greatest(0, v_max_queued - v_reserve - v_queued)
                                            + greatest(0, ceil(v_share - v_mine)::integer));
                ELSIF NOT v_below THEN
                    v_room := least(v_room, v_max_queued - v_reserve - v_queued);
                END IF;
                v_n := least(array_length(v_candidates, 1), v_room, v_fair_n,
                             t.max_concurrent_steps - v_in_flight
                                 - coalesce(array_length(v_admitted, 1), 0),
                             floor(v_tokens)::integer);
                IF v_n > 0 THEN
                    v_admitted := v_admitted || v_candidates[1:v_n];
                    v_tokens := v_tokens - v_n;
                END IF;
            END LOOP;
            IF coalesce(array_length(v_admitted, 1), 0) > 0 THEN
                INSERT INTO tenants_tenantthrottlespend (tenant_id, step_tokens)
                VALUES (r.tenant_id, array_length(v_admitted, 1));
                v_admission := switchyard_steps_admit(v_admitted);
                v_dispatches := v_admission->'dispatches';
                -- This run's step.queued events join its log's; other runs' go back apart.
                SELECT coalesce(v_logged, '[]'::jsonb)
                       || coalesce(jsonb_agg(g->'events') FILTER (WHERE g->>'run' = r.public_id::text)->0, '[]'::jsonb),
                       coalesce(jsonb_agg(g) FILTER (WHERE g->>'run' <> r.public_id::text), '[]'::jsonb)
                  INTO v_logged, v_others_logged
                  FROM jsonb_array_elements(v_admission->'events') g;
            END IF;
        END IF;
        -- The scheduler looks at what this transaction made ready and did not admit.
        IF EXISTS (SELECT 1 FROM unnest(v_ready_ids) x WHERE NOT x = ANY(v_admitted)) THEN
            v_wake := true;
        END IF;
    ELSIF jsonb_array_length(v_admit) > 0 THEN
        v_wake := true;  -- a freed slot alone wakes the scheduler only if steps wait (below)
    END IF;

    IF NOT v_wake AND p_plan->>'wake' = 'if_ready' THEN
        v_wake := EXISTS (SELECT 1 FROM jobs_steprun WHERE status = 'ready');
    END IF;
    RETURN jsonb_build_object(
        'dispatches', v_dispatches,
        -- Whether the scheduler should look: woken by the caller after the commit.
        'wake', v_wake,
        'events', coalesce(v_logged, '[]'::jsonb),
        -- [{"run": public id, "events": [...]}] of the tenant's other runs it admitted steps of
        'other_events', v_others_logged,
        'run', jsonb_build_object('status', r.status,
                                   'next_seq', r.next_seq + jsonb_array_length(
                                       coalesce(v_logged, '[]'::jsonb)))
    );
END;
$$;


-- A run's creation, in one statement: its Idempotency-Key (a live holder is replayed; an
-- expired one is released), the tenant's queued-run quota (429), the freshness of the
-- caller's cached "latest" version and API key, the run, its steps, its first events and the
-- direct admission of its first steps (`switchyard_run_apply` with the engine's first plan).
--
-- p_run: {"tenant_id", "workflow_version_id", "input", "lane", "webhook_url",
--         "idempotency_key", "request_hash", "parent_step_id",
--         "idempotency_ttl_s", "check_queued_runs" (false: child runs),
--         "cached_version": {"workflow_id", "version", "latest"} | null, "api_key_id" | null}
-- Outcomes: "created" (with the run and the apply's result), "replay" (the key's live holder),
-- "queued_runs_full" (with the count), "stale_version", "key_revoked".
CREATE OR REPLACE FUNCTION switchyard_run_submit(p_run jsonb, p_plan jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    r jobs_run%ROWTYPE;
    v_tenant bigint := (p_run->>'tenant_id')::bigint;
    v_key text := coalesce(p_run->>'idempotency_key', '');
    v_now timestamptz := clock_timestamp();
    v_count integer;
    v_quota integer;
    v_applied jsonb;
BEGIN
    IF p_run->>'api_key_id' IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM tenants_apikey
         WHERE id = (p_run->>'api_key_id')::bigint AND revoked_at IS NULL) THEN
        RETURN jsonb_build_object('outcome', 'key_revoked');
    END IF;
    IF v_key <> '' THEN
        SELECT * INTO r FROM jobs_run WHERE tenant_id = v_tenant AND idempotency_key = v_key;
        IF FOUND THEN
            IF r.created_at > v_now - make_interval(
                    secs => (p_run->>'idempotency_ttl_s')::double precision) THEN
                RETURN jsonb_build_object('outcome', 'replay', 'run', to_jsonb(r));
            END IF;
            -- Expired: released here, in the transaction that creates the new holder (a
            -- concurrent reuse waits on this row, then collides on the unique index).
            UPDATE jobs_run SET idempotency_key = '' WHERE id = r.id AND idempotency_key = v_key;
        END IF;
    END IF;
    IF coalesce((p_run->>'check_queued_runs')::boolean, false) THEN
        -- The quota as it is now (the caller's tenant may be a cached copy).
        SELECT max_queued_runs INTO v_quota FROM tenants_tenant WHERE id = v_tenant;
        SELECT count(*) INTO v_count FROM (
            SELECT 1 FROM jobs_run WHERE tenant_id = v_tenant AND status = 'accepted'
             LIMIT v_quota) queued;
        IF v_count >= v_quota THEN
            RETURN jsonb_build_object('outcome', 'queued_runs_full', 'queued', v_count);
        END IF;
    END IF;
    -- A version from the caller's cache: still there, and still the latest if it was asked
    -- for as the latest.
    IF p_run->'cached_version' IS NOT NULL AND jsonb_typeof(p_run->'cached_version') = 'object'
       AND (NOT EXISTS (SELECT 1 FROM jobs_workflowversion
                         WHERE id = (p_run->>'workflow_version_id')::bigint)
            OR (coalesce((p_run->'cached_version'->>'latest')::boolean, false)
                AND EXISTS (SELECT 1 FROM jobs_workflowversion
                             WHERE workflow_id = (p_run->'cached_version'->>'workflow_id')::bigint
                               AND version > (p_run->'cached_version'->>'version')::integer)))
    THEN
        RETURN jsonb_build_object('outcome', 'stale_version');
    END IF;

    INSERT INTO jobs_run (public_id, tenant_id, workflow_version_id, input, lane, status,
                          output, error, idempotency_key, request_hash, webhook_url,
                          parent_step_id, next_seq, created_at, updated_at)
    VALUES (gen_random_uuid(), v_tenant, (p_run->>'workflow_version_id')::bigint,
            p_run->'input', p_run->>'lane', 'accepted', NULL, '', v_key,
            coalesce(p_run->>'request_hash', ''), coalesce(p_run->>'webhook_url', ''),
            (p_run->>'parent_step_id')::bigint, 1, v_now, v_now)
    ON CONFLICT (tenant_id, idempotency_key) WHERE NOT (idempotency_key = '') DO NOTHING
    RETURNING * INTO r;
    IF NOT FOUND THEN
        -- A concurrent request with the same key committed its run first.
        SELECT * INTO r FROM jobs_run WHERE tenant_id = v_tenant AND idempotency_key = v_key;
        RETURN jsonb_build_object('outcome', 'replay', 'run', to_jsonb(r));
    END IF;
    v_applied := switchyard_run_apply(r.id, p_plan);
    SELECT * INTO r FROM jobs_run WHERE id = r.id;
    RETURN jsonb_build_object('outcome', 'created', 'run', to_jsonb(r),
                              'dispatches', v_applied->'dispatches',
                              'events', v_applied->'events',
                              'wake', v_applied->'wake');
END;
$$;
