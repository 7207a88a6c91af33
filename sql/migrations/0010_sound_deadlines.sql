-- Deadlines that can always fire, and instance migrations that survive concurrent writers.
--
-- migrate_instances_v1 kept a migrated instance's running deadline whenever its state kept
-- its name, even where the new version gives that state no timeout: the instance then had a
-- deadline and no timeout edge. The deadline sweeper picked it first on every sweep and
-- failed the whole sweep for every tenant, and transition_v3's "is this the timeout edge"
-- came out NULL, which skipped the deadline and lease checks, so a writer without the lease
-- could move an instance another owner held. Now: the migration clears a deadline the new
-- version does not time; transition_v3 treats that test as false, never NULL; the sweeper
-- takes only states with a timeout edge; register_machine_v1 refuses a new definition with a
-- timeout and no on_timeout edge (the Python class already did); and existing instances in such a state
-- lose their stale deadline below.
--
-- migrate_instances_v1 also locked and wrote its streams one by one, so a writer that
-- committed to a later stream of the batch meanwhile carried a newer transaction id, and
-- the writer-order check refused the whole batch (40001). It now takes every lock of the
-- batch before its first write, and skips an instance that finished meanwhile.
--
-- release_lease_v1 refused to give up a lease on a finished instance (SM008); it no longer
-- checks the state. It and lease_head now share locked_head (the head row under its lock).

CREATE FUNCTION pgstate.locked_head(p_tenant text, p_stream_id text) RETURNS pgstate.streams
LANGUAGE plpgsql AS $$
DECLARE
    v_head pgstate.streams%ROWTYPE;
BEGIN
    PERFORM pgstate.check_stream_id(p_tenant, p_stream_id);
    PERFORM pgstate.lock_stream(p_tenant, p_stream_id);
    SELECT * INTO v_head FROM pgstate.streams s
     WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id;
    IF NOT FOUND THEN
        PERFORM pgstate.raise_error('SM001', format('no stream %s', p_stream_id),
            pgstate.head_json(p_tenant, p_stream_id));
    END IF;
    RETURN v_head;
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.lease_head(p_tenant text, p_stream_id text) RETURNS pgstate.streams
LANGUAGE plpgsql AS $$
DECLARE
    v_head  pgstate.streams%ROWTYPE;
    v_final boolean;
BEGIN
    v_head := pgstate.locked_head(p_tenant, p_stream_id);
    SELECT st.final INTO v_final FROM pgstate.machine_states st
     WHERE st.name = v_head.machine AND st.version = v_head.machine_version
       AND st.state = v_head.state;
    IF v_final THEN
        PERFORM pgstate.raise_error('SM008',
            format('%s is in final state %s', p_stream_id, v_head.state),
            pgstate.head_json(p_tenant, p_stream_id));
    END IF;
    RETURN v_head;
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.register_machine_v1(p_name text, p_def_hash text, p_definition jsonb,
    OUT o_version integer, OUT o_created boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_latest_hash text;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z][A-Za-z0-9_.-]{0,99}$' THEN
        PERFORM pgstate.raise_error('SM012', 'machine name must be 1 to 100 letters, digits, _ . -',
            jsonb_build_object('field', 'machine', 'value', p_name));
    END IF;
    IF p_def_hash IS NULL OR p_def_hash !~ '^[0-9a-f]{64}$' THEN
        PERFORM pgstate.raise_error('SM012', 'def_hash must be a sha256 hex digest',
            jsonb_build_object('field', 'def_hash'));
    END IF;
    IF jsonb_typeof(p_definition) IS DISTINCT FROM 'object'
       OR jsonb_typeof(p_definition -> 'states') IS DISTINCT FROM 'object'
       OR jsonb_typeof(p_definition -> 'edges') IS DISTINCT FROM 'array'
       OR NOT (p_definition -> 'states') ? (p_definition ->> 'initial') THEN
        PERFORM pgstate.raise_error('SM012', 'definition needs states, edges and a known initial state',
            jsonb_build_object('field', 'definition'));
    END IF;

    PERFORM pg_advisory_xact_lock(hashtextextended('pgstate-machine/' || p_name, 0));
    SELECT m.version, m.def_hash INTO o_version, v_latest_hash
      FROM pgstate.machines m WHERE m.name = p_name
     ORDER BY m.version DESC LIMIT 1;
    IF v_latest_hash = p_def_hash THEN
        o_created := false;
        RETURN;
    END IF;
    -- A deadline needs its timeout edge, and the edge its deadline: a state with one and
    -- not the other would be stuck once its deadline passed, and no sweep could fire it.
    IF EXISTS (SELECT 1 FROM jsonb_each(p_definition -> 'states') s
                WHERE (s.value ->> 'timeout_ms' IS NULL) <> (s.value ->> 'on_timeout' IS NULL)
                   OR (s.value ->> 'on_timeout' IS NOT NULL AND NOT EXISTS (
                           SELECT 1 FROM jsonb_array_elements(p_definition -> 'edges') e
                            WHERE e ->> 'from' = s.key
                              AND e ->> 'event' = s.value ->> 'on_timeout'))) THEN
        PERFORM pgstate.raise_error('SM012',
            'a state with a timeout needs an on_timeout event with an edge from it, and back',
            jsonb_build_object('field', 'definition'));
    END IF;
    o_version := coalesce(o_version, 0) + 1;
    o_created := true;

    INSERT INTO pgstate.machines (name, version, def_hash, definition, initial_state)
    VALUES (p_name, o_version, p_def_hash, p_definition, p_definition ->> 'initial');
    INSERT INTO pgstate.machine_states (name, version, state, final, timeout, on_timeout)
    SELECT p_name, o_version, s.key, coalesce((s.value ->> 'final')::boolean, false),
           CASE WHEN s.value ->> 'timeout_ms' IS NOT NULL
                THEN make_interval(secs => (s.value ->> 'timeout_ms')::double precision / 1000) END,
           s.value ->> 'on_timeout'
      FROM jsonb_each(p_definition -> 'states') s;
    INSERT INTO pgstate.machine_edges (name, version, from_state, event, to_state,
                                       requires_lease, guard, to_timeout)
    SELECT p_name, o_version, e ->> 'from', e ->> 'event', e ->> 'to',
           coalesce((e ->> 'requires_lease')::boolean, false),
           CASE WHEN jsonb_typeof(e -> 'guard') = 'object' THEN e -> 'guard' END,
           target.timeout
      FROM jsonb_array_elements(p_definition -> 'edges') e
      LEFT JOIN pgstate.machine_states target
             ON target.name = p_name AND target.version = o_version
            AND target.state = e ->> 'to';
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.transition_v3(
    p_tenant text, p_stream_id text, p_event text,
    p_expected_state text, p_expected_version bigint,
    p_idempotency_key text, p_actor jsonb, p_reason text, p_data jsonb,
    p_lease_epoch bigint, p_traceparent text,
    p_event_id uuid, p_causation_id uuid, p_correlation_id uuid,
    p_release_lease boolean, p_on_rejection text, p_event_type text)
RETURNS pgstate.transition_outcome
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
-- Every statement here is a keyed lookup: a young table's few pages must not get a scan
-- plan cached for the session.
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    o_outcome        text;
    o_code           text;
    o_message        text;
    o_from_state     text;
    o_to_state       text;
    o_version        bigint;
    o_tx             xid8;
    o_pos            bigint;
    o_lease_epoch    bigint;
    o_deadline_at    timestamptz;
    o_detail         jsonb;
    v_started        timestamptz;
    v_now            timestamptz;
    v_hash           text;
    v_stored_hash    text;
    v_stored         jsonb;
    -- The head row and its rules, as scalars: a record variable costs a lookup per field.
    v_found          boolean;
    v_state          text;
    v_version        bigint;
    v_category       text;
    v_machine        text;
    v_machine_version integer;
    v_owner          text;
    v_epoch          bigint;
    v_expires        timestamptz;
    v_deadline       timestamptz;
    v_archived       boolean;
    v_last_tx        xid8;
    v_final          boolean;
    v_on_timeout     text;
    v_requires_lease boolean;
    v_guard          jsonb;
    v_target_timeout interval;
    v_edge_found     boolean;
    v_is_timeout     boolean;
    v_lease_live     boolean;
    v_guard_error    text;
BEGIN
    -- Every input check in one expression; the precise error only once one fails.
    IF (length(p_tenant) BETWEEN 1 AND 100 AND length(p_stream_id) BETWEEN 1 AND 200
        AND length(p_event) BETWEEN 1 AND 100
        AND coalesce(p_expected_version >= 0, true)
        AND coalesce(length(p_idempotency_key) BETWEEN 1 AND 200, true)
        AND coalesce(length(p_event_type) BETWEEN 1 AND 200, true)
        AND coalesce(jsonb_typeof(p_data) = 'object', true)
        AND p_on_rejection IN ('raise', 'record', 'return')) IS NOT TRUE THEN
        PERFORM pgstate.check_stream_id(p_tenant, p_stream_id);
        IF p_event IS NULL OR length(p_event) NOT BETWEEN 1 AND 100 THEN
            PERFORM pgstate.raise_error('SM012', 'event must be 1 to 100 characters',
                jsonb_build_object('field', 'event'));
        END IF;
        IF p_expected_version < 0 THEN
            PERFORM pgstate.raise_error('SM012', 'expected_version must be >= 0',
                jsonb_build_object('field', 'expected_version'));
        END IF;
        IF length(p_idempotency_key) NOT BETWEEN 1 AND 200 THEN
            PERFORM pgstate.raise_error('SM012', 'idempotency key must be 1 to 200 characters',
                jsonb_build_object('field', 'idempotency_key'));
        END IF;
        IF length(p_event_type) NOT BETWEEN 1 AND 200 THEN
            PERFORM pgstate.raise_error('SM012', 'event type must be 1 to 200 characters',
                jsonb_build_object('field', 'record_as'));
        END IF;
        IF jsonb_typeof(p_data) <> 'object' THEN
            PERFORM pgstate.raise_error('SM012', 'data must be a JSON object',
                jsonb_build_object('field', 'data'));
        END IF;
        PERFORM pgstate.raise_error('SM012', 'on_rejection must be raise, record or return',
            jsonb_build_object('field', 'on_rejection'));
    END IF;

    -- A free lock is taken in an expression, with no statement to run; only a busy one waits,
    -- and only then is the wait timed (a free lock reports 0).
    IF NOT pg_try_advisory_xact_lock(hashtextextended(p_tenant || '/' || p_stream_id, 0)) THEN
        v_started := clock_timestamp();
        PERFORM pg_advisory_xact_lock(hashtextextended(p_tenant || '/' || p_stream_id, 0));
    END IF;
    v_now := clock_timestamp();

    <<checks>>
    BEGIN
        -- 1. A known key answers before anything else, even though the stream has moved on.
        IF p_idempotency_key IS NOT NULL THEN
            v_hash := md5(jsonb_build_array(p_event, p_expected_state, p_expected_version,
                                            coalesce(p_data, '{}'::jsonb), p_lease_epoch,
                                            p_event_type, p_release_lease)::text);
            SELECT k.request_hash, k.result INTO v_stored_hash, v_stored
              FROM pgstate.idempotency_keys k
             WHERE k.tenant = p_tenant AND k.stream_id = p_stream_id
               AND k.key = p_idempotency_key;
            IF FOUND THEN
                IF v_stored_hash = v_hash THEN
                    o_outcome := 'duplicate';
                    o_from_state := v_stored ->> 'from_state';
                    o_to_state := v_stored ->> 'to_state';
                    o_version := (v_stored ->> 'version')::bigint;
                    o_tx := (v_stored ->> 'tx')::xid8;
                    o_pos := (v_stored ->> 'pos')::bigint;
                    o_lease_epoch := (v_stored ->> 'lease_epoch')::bigint;
                    o_deadline_at := (v_stored ->> 'deadline_at')::timestamptz;
                    RETURN (o_outcome, o_code, o_message, o_from_state, o_to_state, o_version,
                            o_tx, o_pos, o_lease_epoch, o_deadline_at,
                            coalesce((extract(epoch FROM v_now - v_started) * 1000000)
                                     ::bigint, 0),
                            o_detail)
                           ::pgstate.transition_outcome;
                END IF;
                o_code := 'SM006';
                o_message := format('idempotency key %s was used for a different request',
                                    p_idempotency_key);
                EXIT checks;
            END IF;
        END IF;

        -- 2. The instance, and the edge this event takes from its current state (with the
        -- target state's timeout copied onto the edge): one two-table lookup.
        SELECT s.state, s.version, s.category, s.machine, s.machine_version,
               s.lease_owner, s.lease_epoch, s.lease_expires_at, s.deadline_at, s.archived,
               s.last_tx, e.requires_lease, e.guard, e.to_timeout, e.to_state,
               e.event IS NOT NULL
          INTO v_state, v_version, v_category, v_machine, v_machine_version,
               v_owner, v_epoch, v_expires, v_deadline, v_archived, v_last_tx,
               v_requires_lease, v_guard, v_target_timeout, o_to_state, v_edge_found
          FROM pgstate.streams s
          LEFT JOIN pgstate.machine_edges e
                 ON e.name = s.machine AND e.version = s.machine_version
                AND e.from_state = s.state AND e.event = p_event
         WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id;
        -- The common request (a legal edge, no deadline passed, no lease involved, no
        -- guard, the expected state and version met) passes every check below: skip them.
        IF v_edge_found AND v_guard IS NULL AND NOT v_requires_lease
           AND p_lease_epoch IS NULL AND (v_owner IS NULL OR v_expires <= v_now)
           AND (v_deadline IS NULL OR v_deadline > v_now)
           AND (p_expected_state IS NULL OR p_expected_state = v_state)
           AND (p_expected_version IS NULL OR p_expected_version = v_version) THEN
            EXIT checks;
        END IF;
        v_found := FOUND;  -- still the SELECT's answer: an IF does not change FOUND
        IF NOT v_found OR v_machine IS NULL THEN
            o_code := 'SM001';
            o_message := format('no state-machine instance %s', p_stream_id);
            EXIT checks;
        END IF;
        -- The current state's own rules matter only off the common path: with no edge for
        -- this event (a final state has none) or with the state's deadline passed.
        IF NOT v_edge_found OR v_deadline <= v_now THEN
            SELECT st.final, st.on_timeout INTO v_final, v_on_timeout
              FROM pgstate.machine_states st
             WHERE st.name = v_machine AND st.version = v_machine_version
               AND st.state = v_state;
        END IF;
        IF v_final THEN
            o_code := 'SM008';
            o_message := format('%s is in final state %s', p_stream_id, v_state);
            EXIT checks;
        END IF;

        -- 3. Deadline, on the clock (not the transaction start): no sweeper needs to have run.
        -- Never NULL: a NULL here would skip the deadline and lease checks below.
        v_is_timeout := coalesce(v_deadline <= v_now AND v_on_timeout = p_event, false);
        IF v_deadline <= v_now AND NOT v_is_timeout THEN
            o_code := 'SM007';
            o_message := format('the deadline of state %s passed at %s', v_state,
                                v_deadline);
            EXIT checks;
        END IF;

        -- 4. Lease and fencing epoch. A due timeout edge overrides any lease.
        IF NOT v_is_timeout THEN
            v_lease_live := v_owner IS NOT NULL AND v_expires > v_now;
            IF p_lease_epoch IS NOT NULL THEN
                IF p_lease_epoch <> v_epoch OR NOT v_lease_live THEN
                    o_code := 'SM005';
                    o_message := format('lease epoch %s is stale or expired (current epoch %s)',
                                        p_lease_epoch, v_epoch);
                    EXIT checks;
                END IF;
            ELSIF v_lease_live THEN
                o_code := 'SM010';
                o_message := format('%s holds the lease on %s', v_owner, p_stream_id);
                EXIT checks;
            ELSIF coalesce(v_requires_lease, false) THEN
                o_code := 'SM005';
                o_message := format('event %s requires a lease', p_event);
                EXIT checks;
            END IF;
        END IF;

        -- 5. State and version both, so A -> B -> A cannot pass for "unchanged".
        IF p_expected_state IS NOT NULL AND p_expected_state <> v_state THEN
            o_code := 'SM003';
            o_message := format('%s is in state %s, expected %s', p_stream_id, v_state,
                                p_expected_state);
            EXIT checks;
        END IF;
        IF p_expected_version IS NOT NULL AND p_expected_version <> v_version THEN
            o_code := 'SM004';
            o_message := format('%s is at version %s, expected %s', p_stream_id,
                                v_version, p_expected_version);
            EXIT checks;
        END IF;

        -- 6. The edge and its guard.
        IF NOT v_edge_found THEN
            o_code := 'SM002';
            o_message := format('no transition %s from state %s', p_event, v_state);
            EXIT checks;
        END IF;
        -- A due timeout edge is the system's, not a request: no guard applies to it.
        IF v_guard IS NOT NULL AND NOT v_is_timeout THEN
            v_guard_error := pgstate.guard_failure(v_guard, coalesce(p_data, '{}'::jsonb),
                                                   p_actor);
            IF v_guard_error IS NOT NULL THEN
                o_code := 'SM011';
                o_message := v_guard_error;
                EXIT checks;
            END IF;
        END IF;
    END;

    IF o_code IS NOT NULL THEN
        -- The detail carries the head row (as head_json shapes it): read here when the
        -- checks stopped before reading it (an unknown instance, a reused key), else built
        -- from the row already read. A rejection returns in one expression: each separate
        -- assignment would be one more expression to prepare in every new transaction.
        IF v_found IS NOT TRUE THEN
            o_detail := pgstate.head_json(p_tenant, p_stream_id)
                || jsonb_build_object('event', p_event, 'expected_state', p_expected_state,
                                      'expected_version', p_expected_version,
                                      'given_lease_epoch', p_lease_epoch);
        ELSE
            o_detail := jsonb_build_object(
                'tenant', p_tenant, 'stream_id', p_stream_id, 'category', v_category,
                'version', v_version, 'state', v_state, 'machine', v_machine,
                'machine_version', v_machine_version, 'lease_owner', v_owner,
                'lease_epoch', v_epoch, 'lease_expires_at', v_expires,
                'deadline_at', v_deadline, 'archived', v_archived,
                'event', p_event, 'expected_state', p_expected_state,
                'expected_version', p_expected_version, 'given_lease_epoch', p_lease_epoch);
        END IF;
        IF p_on_rejection <> 'return' THEN
            IF p_on_rejection = 'raise' THEN
                PERFORM pgstate.raise_error(o_code, o_message, o_detail);
            END IF;
            INSERT INTO pgstate.rejections (tenant, stream_id, event, code, message, detail,
                                            actor, reason, idempotency_key, traceparent)
            VALUES (p_tenant, p_stream_id, p_event, o_code, o_message, o_detail, p_actor,
                    p_reason, p_idempotency_key, p_traceparent);
        END IF;
        RETURN ('rejected', o_code, o_message, o_detail ->> 'state', NULL,
                (o_detail ->> 'version')::bigint, NULL, NULL,
                (o_detail ->> 'lease_epoch')::bigint,
                (o_detail ->> 'deadline_at')::timestamptz,
                coalesce((extract(epoch FROM v_now - v_started) * 1000000)::bigint, 0), o_detail)
               ::pgstate.transition_outcome;
    END IF;

    -- 7. Apply: the event, the head row and the idempotency row, all in this transaction.
    IF v_last_tx > pg_current_xact_id() THEN
        PERFORM pgstate.check_writer_order(p_tenant, p_stream_id, v_last_tx);
    END IF;
    -- From here the head row's values are the new head's, computed in the statements below
    -- rather than assigned one by one: each assignment is one more expression to prepare in
    -- every new transaction.
    IF v_is_timeout OR (p_release_lease AND p_lease_epoch IS NOT NULL) THEN
        IF v_is_timeout THEN
            -- The timeout fences whoever held the lease: their epoch is now stale.
            v_epoch := v_epoch + 1;
        END IF;
        v_owner := NULL;
        v_expires := NULL;
    END IF;

    INSERT INTO pgstate.events (tenant, stream_id, version, category, type, data, metadata,
                                event_id, causation_id, correlation_id, actor, traceparent,
                                machine_version)
    VALUES (p_tenant, p_stream_id, v_version + 1, v_category, coalesce(p_event_type, p_event),
            coalesce(p_data, '{}'::jsonb),
            jsonb_strip_nulls(jsonb_build_object(
                'from_state', v_state, 'to_state', o_to_state, 'reason', p_reason,
                'event', CASE WHEN p_event_type IS NOT NULL THEN p_event END,
                'idempotency_key', p_idempotency_key, 'lease_epoch', p_lease_epoch,
                'timeout', CASE WHEN v_is_timeout THEN true END)),
            coalesce(p_event_id, gen_random_uuid()), p_causation_id, p_correlation_id,
            p_actor, p_traceparent, v_machine_version)
    RETURNING tx, pos INTO o_tx, o_pos;

    UPDATE pgstate.streams
       SET state = o_to_state, version = v_version + 1, deadline_at = v_now + v_target_timeout,
           lease_epoch = v_epoch, lease_owner = v_owner, lease_expires_at = v_expires,
           updated_at = v_now, last_tx = pg_current_xact_id()
     WHERE tenant = p_tenant AND stream_id = p_stream_id;

    IF p_idempotency_key IS NOT NULL THEN
        INSERT INTO pgstate.idempotency_keys (tenant, stream_id, key, request_hash, result)
        VALUES (p_tenant, p_stream_id, p_idempotency_key, v_hash,
                jsonb_build_object('from_state', v_state, 'to_state', o_to_state,
                                   'version', v_version + 1, 'tx', o_tx::text, 'pos', o_pos,
                                   'lease_epoch', v_epoch,
                                   'deadline_at', v_now + v_target_timeout));
    END IF;
    RETURN ('applied', NULL, NULL, v_state, o_to_state, v_version + 1, o_tx, o_pos, v_epoch,
            v_now + v_target_timeout,
            coalesce((extract(epoch FROM v_now - v_started) * 1000000)::bigint, 0), NULL)
           ::pgstate.transition_outcome;
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.release_lease_v1(p_tenant text, p_stream_id text, p_owner text,
    p_epoch bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    v_head pgstate.streams%ROWTYPE;
BEGIN
    PERFORM pgstate.check_lease_args(p_owner, 1);
    -- Not lease_head: a lease may be given up on a finished instance too.
    v_head := pgstate.locked_head(p_tenant, p_stream_id);
    IF v_head.lease_owner IS DISTINCT FROM p_owner OR v_head.lease_epoch <> p_epoch THEN
        PERFORM pgstate.raise_error('SM005',
            format('%s does not hold lease epoch %s on %s', p_owner, p_epoch, p_stream_id),
            pgstate.head_json(p_tenant, p_stream_id));
    END IF;
    UPDATE pgstate.streams SET lease_owner = NULL, lease_expires_at = NULL
     WHERE tenant = p_tenant AND stream_id = p_stream_id;
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.fire_due_timeouts_v1(p_limit integer,
    OUT o_tenant text, OUT o_stream_id text, OUT o_event text, OUT o_from_state text,
    OUT o_to_state text, OUT o_version bigint, OUT o_lease_epoch bigint)
RETURNS SETOF record
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_candidate record;
    v_fired     integer := 0;
    v_result    record;
BEGIN
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 10000 THEN
        PERFORM pgstate.raise_error('SM012', 'limit must be 1 to 10000',
            jsonb_build_object('field', 'limit'));
    END IF;
    FOR v_candidate IN
        SELECT s.tenant, s.stream_id, s.state, s.version, st.on_timeout
          FROM pgstate.streams s
          JOIN pgstate.machine_states st
            ON st.name = s.machine AND st.version = s.machine_version AND st.state = s.state
         WHERE s.deadline_at <= clock_timestamp() AND st.on_timeout IS NOT NULL
         ORDER BY s.deadline_at
         LIMIT p_limit * 4
    LOOP
        EXIT WHEN v_fired >= p_limit;
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(
            hashtextextended(v_candidate.tenant || '/' || v_candidate.stream_id, 0));
        -- Re-read under the lock: a normal event may have moved the instance meanwhile.
        CONTINUE WHEN NOT EXISTS (
            SELECT 1 FROM pgstate.streams s
             WHERE s.tenant = v_candidate.tenant AND s.stream_id = v_candidate.stream_id
               AND s.version = v_candidate.version AND s.deadline_at <= clock_timestamp());
        SELECT * INTO v_result FROM pgstate.transition_v1(
            v_candidate.tenant, v_candidate.stream_id, v_candidate.on_timeout,
            v_candidate.state, v_candidate.version,
            'timeout:' || v_candidate.stream_id || ':' || v_candidate.version,
            jsonb_build_object('kind', 'system', 'name', 'deadline-sweeper'),
            'deadline passed', NULL, NULL, NULL, NULL, NULL, NULL, false, false, NULL);
        CONTINUE WHEN v_result.o_outcome <> 'applied';
        v_fired := v_fired + 1;
        o_tenant := v_candidate.tenant;
        o_stream_id := v_candidate.stream_id;
        o_event := v_candidate.on_timeout;
        o_from_state := v_result.o_from_state;
        o_to_state := v_result.o_to_state;
        o_version := v_result.o_version;
        o_lease_epoch := v_result.o_lease_epoch;
        RETURN NEXT;
    END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.migrate_instances_v1(p_tenant text, p_machine text,
    p_from_version integer, p_to_version integer, p_state_map jsonb, p_actor jsonb,
    p_after text, p_limit integer, OUT o_moved bigint, OUT o_last text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    v_map      jsonb;
    v_missing  jsonb;
    v_streams  text[];
    v_stream   text;
    v_head     pgstate.streams%ROWTYPE;
    v_to_state text;
    v_timeout  interval;
BEGIN
    o_moved := 0;
    IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 10000 THEN
        PERFORM pgstate.raise_error('SM012', 'limit must be 1 to 10000',
            jsonb_build_object('field', 'limit'));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgstate.machines WHERE name = p_machine AND version = p_from_version)
       OR NOT EXISTS (SELECT 1 FROM pgstate.machines WHERE name = p_machine AND version = p_to_version) THEN
        PERFORM pgstate.raise_error('SM009',
            format('machine %s has no version %s or %s', p_machine, p_from_version, p_to_version),
            jsonb_build_object('machine', p_machine));
    END IF;
    IF jsonb_typeof(coalesce(p_state_map, '{}'::jsonb)) <> 'object' THEN
        PERFORM pgstate.raise_error('SM012', 'state map must be a JSON object',
            jsonb_build_object('field', 'state_map'));
    END IF;
    -- States that exist under the same name in both versions map to themselves by default.
    SELECT coalesce(jsonb_object_agg(a.state, a.state), '{}'::jsonb) || coalesce(p_state_map, '{}'::jsonb)
      INTO v_map
      FROM pgstate.machine_states a
      JOIN pgstate.machine_states b
        ON b.name = a.name AND b.version = p_to_version AND b.state = a.state
     WHERE a.name = p_machine AND a.version = p_from_version;
    SELECT jsonb_agg(a.state ORDER BY a.state) INTO v_missing
      FROM pgstate.machine_states a
     WHERE a.name = p_machine AND a.version = p_from_version
       AND NOT EXISTS (SELECT 1 FROM pgstate.machine_states b
                        WHERE b.name = p_machine AND b.version = p_to_version
                          AND b.state = v_map ->> a.state);
    IF v_missing IS NOT NULL THEN
        PERFORM pgstate.raise_error('SM012',
            format('the state map does not take states %s to states of version %s',
                   v_missing, p_to_version),
            jsonb_build_object('field', 'state_map', 'unmapped', v_missing));
    END IF;

    -- Finished instances stay as they are. Batches (p_after, p_limit) keep the number of
    -- stream locks held by one transaction bounded; ids go in byte order, as Python sorts.
    -- Every lock of the batch is taken before the first write: this transaction gets its id
    -- at that write, so a writer that committed to a later stream of the batch meanwhile
    -- (with a newer id) would otherwise make the writer-order check refuse the whole batch.
    SELECT array_agg(c.stream_id ORDER BY c.stream_id COLLATE "C") INTO v_streams
      FROM (SELECT s.stream_id FROM pgstate.streams s
              JOIN pgstate.machine_states st
                ON st.name = s.machine AND st.version = s.machine_version AND st.state = s.state
             WHERE s.tenant = p_tenant AND s.machine = p_machine
               AND s.machine_version = p_from_version AND NOT st.final
               AND (p_after IS NULL OR s.stream_id COLLATE "C" > p_after COLLATE "C")
             ORDER BY s.stream_id COLLATE "C"
             LIMIT p_limit) c;
    IF v_streams IS NULL THEN
        RETURN;
    END IF;
    o_last := v_streams[array_upper(v_streams, 1)];
    FOREACH v_stream IN ARRAY v_streams LOOP
        PERFORM pgstate.lock_stream(p_tenant, v_stream);
    END LOOP;
    FOREACH v_stream IN ARRAY v_streams LOOP
        -- Re-read under the lock: it may have moved on, or finished, since it was listed.
        SELECT s.* INTO v_head FROM pgstate.streams s
          JOIN pgstate.machine_states st
            ON st.name = s.machine AND st.version = s.machine_version AND st.state = s.state
         WHERE s.tenant = p_tenant AND s.stream_id = v_stream
           AND s.machine_version = p_from_version AND NOT st.final;
        CONTINUE WHEN NOT FOUND;
        PERFORM pgstate.check_writer_order(p_tenant, v_stream, v_head.last_tx);
        v_to_state := v_map ->> v_head.state;
        SELECT st.timeout INTO v_timeout FROM pgstate.machine_states st
         WHERE st.name = p_machine AND st.version = p_to_version AND st.state = v_to_state;
        INSERT INTO pgstate.events (tenant, stream_id, version, category, type, data, metadata,
                                    event_id, actor, machine_version)
        VALUES (p_tenant, v_stream, v_head.version + 1, v_head.category, '$migrated',
                jsonb_build_object('from_version', p_from_version, 'to_version', p_to_version,
                                   'from_state', v_head.state, 'to_state', v_to_state),
                jsonb_build_object('from_state', v_head.state, 'to_state', v_to_state),
                gen_random_uuid(), p_actor, p_to_version);
        -- A state kept under its name keeps its running deadline, if the new version still
        -- times it out; a state without a timeout there has no deadline.
        UPDATE pgstate.streams
           SET state = v_to_state, machine_version = p_to_version, version = v_head.version + 1,
               last_tx = pg_current_xact_id(),
               deadline_at = CASE WHEN v_timeout IS NULL THEN NULL
                                  WHEN v_to_state = v_head.state AND v_head.deadline_at IS NOT NULL
                                  THEN v_head.deadline_at
                                  ELSE clock_timestamp() + v_timeout END,
               updated_at = clock_timestamp()
         WHERE tenant = p_tenant AND stream_id = v_stream;
        o_moved := o_moved + 1;
    END LOOP;
END;
$$;

-- Instances whose state has no timeout edge lose the deadline nothing could fire.
UPDATE pgstate.streams s
   SET deadline_at = NULL
  FROM pgstate.machine_states st
 WHERE st.name = s.machine AND st.version = s.machine_version AND st.state = s.state
   AND s.deadline_at IS NOT NULL AND st.on_timeout IS NULL;

-- The new function's rights, as 900_grants.sql gives every function.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgstate FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgstate_reader') THEN
        GRANT USAGE ON SCHEMA pgstate TO pgstate_reader;
        GRANT SELECT ON ALL TABLES IN SCHEMA pgstate TO pgstate_reader;
        GRANT EXECUTE ON FUNCTION pgstate.read_all_v1(text, xid8, bigint, integer, text[]),
            pgstate.read_category_v1(text, text, xid8, bigint, integer, text[])
            TO pgstate_reader;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgstate_writer') THEN
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgstate TO pgstate_writer;
    END IF;
END;
$$;
