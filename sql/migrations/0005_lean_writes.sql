-- Leaner writes: the same answers and errors as before, for less server work per call
-- (instruction counts in benchmarks/BENCHMARKS.md).
--
-- * transition_v3 and append_one_v2 return declared row types: with OUT parameters the
--   server rebuilds the result's row type from the catalog on every call, twice.
-- * A free stream lock is taken in an expression (pg_try_advisory_xact_lock); only a busy
--   one runs the waiting statement.
-- * transition_v3 reads the head row and the edge in one two-table lookup (the target
--   state's timeout is copied onto the edge) and skips the rejection checks when the
--   request plainly passes them; the current state's own rules are read only when needed.
-- * transition_v2 and append_one_v1 become thin wrappers, kept for older callers.
-- * The write functions plan with sequential and bitmap scans off: every statement in them
--   is a keyed lookup, and a plan made while a table was a few pages (a seq scan) stayed
--   cached for the session, costing more than the rest of the call once the table grew.
-- * The id probe of append_one runs only for "any" and "exists", as its own statement, and
--   append_one_v2 refuses a plain version conflict itself instead of handing it to append_v1.
-- * The version CHECK constraints go: each was rebuilt from its stored text in every
--   INSERT and UPDATE, and the write functions already guarantee versions >= 1 (the
--   UNIQUE (tenant, stream_id, version) constraint stays the real guard).

ALTER TABLE pgstate.events DROP CONSTRAINT events_version_check;
ALTER TABLE pgstate.streams DROP CONSTRAINT streams_version_check;

ALTER TABLE pgstate.machine_edges ADD COLUMN to_timeout interval;
UPDATE pgstate.machine_edges e
   SET to_timeout = target.timeout
  FROM pgstate.machine_states target
 WHERE target.name = e.name AND target.version = e.version AND target.state = e.to_state;

ALTER FUNCTION pgstate.append_v1(text, text, bigint, uuid[], text[], text[], text[], integer[],
                                 uuid[], uuid[], jsonb, text)
    SET enable_seqscan = off;
ALTER FUNCTION pgstate.append_v1(text, text, bigint, uuid[], text[], text[], text[], integer[],
                                 uuid[], uuid[], jsonb, text)
    SET enable_bitmapscan = off;

-- register_machine_v1: store a compiled definition. The same definition as the newest
-- version is a no-op; anything else becomes the next version.
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

-- The row transition_v3 returns. A declared type rather than OUT parameters: for OUT
-- parameters the server rebuilds the result's row type from the catalog on every call.
CREATE TYPE pgstate.transition_outcome AS (
    outcome text, code text, message text, from_state text, to_state text, version bigint,
    tx xid8, pos bigint, lease_epoch bigint, deadline_at timestamptz, lock_wait_us bigint,
    detail jsonb);

-- transition_v3: one state-machine step, checked and applied in one transaction.
-- Check order (the design): stream lock; idempotency key; instance; terminal state;
-- deadline; lease and fencing epoch; expected state and version; legal edge; guard.
-- p_event_type names the stored event (default: the machine event's name).
-- p_on_rejection: 'raise' raises the typed error; 'record' returns the rejection (outcome
-- 'rejected') and records it for audit; 'return' only returns it, writing nothing. The
-- Python client uses 'return' and raises the typed error itself: an ERROR would cost the
-- server an abort and the client an exception round, for the same information.
CREATE FUNCTION pgstate.transition_v3(
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
    o_lock_wait_us   bigint;
    o_detail         jsonb;
    v_started        timestamptz;
    v_now            timestamptz;
    v_hash           text;
    v_stored_hash    text;
    v_stored         jsonb;
    -- The head row and its rules, as scalars: a record variable costs a lookup per field.
    v_found          boolean := false;
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
    v_is_timeout     boolean := false;
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

    v_started := clock_timestamp();
    -- A free lock is taken in an expression, with no statement to run; only a busy one waits.
    IF NOT pg_try_advisory_xact_lock(hashtextextended(p_tenant || '/' || p_stream_id, 0)) THEN
        PERFORM pg_advisory_xact_lock(hashtextextended(p_tenant || '/' || p_stream_id, 0));
    END IF;
    v_now := clock_timestamp();
    o_lock_wait_us := (extract(epoch FROM v_now - v_started) * 1000000)::bigint;

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
                            o_tx, o_pos, o_lease_epoch, o_deadline_at, o_lock_wait_us, o_detail)
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
        v_is_timeout := v_deadline IS NOT NULL AND v_deadline <= v_now
                        AND v_on_timeout = p_event;
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
        IF NOT v_found THEN
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
                (o_detail ->> 'deadline_at')::timestamptz, o_lock_wait_us, o_detail)
               ::pgstate.transition_outcome;
    END IF;

    -- 7. Apply: the event, the head row and the idempotency row, all in this transaction.
    IF v_last_tx > pg_current_xact_id() THEN
        PERFORM pgstate.check_writer_order(p_tenant, p_stream_id, v_last_tx);
    END IF;
    o_outcome := 'applied';
    o_from_state := v_state;
    o_version := v_version + 1;
    o_lease_epoch := v_epoch;
    IF v_is_timeout THEN
        -- The timeout fences whoever held the lease: their epoch is now stale.
        o_lease_epoch := o_lease_epoch + 1;
        v_owner := NULL;
        v_expires := NULL;
    ELSIF p_release_lease AND p_lease_epoch IS NOT NULL THEN
        v_owner := NULL;
        v_expires := NULL;
    END IF;
    o_deadline_at := v_now + v_target_timeout;

    INSERT INTO pgstate.events (tenant, stream_id, version, category, type, data, metadata,
                                event_id, causation_id, correlation_id, actor, traceparent,
                                machine_version)
    VALUES (p_tenant, p_stream_id, o_version, v_category, coalesce(p_event_type, p_event),
            coalesce(p_data, '{}'::jsonb),
            jsonb_strip_nulls(jsonb_build_object(
                'from_state', o_from_state, 'to_state', o_to_state, 'reason', p_reason,
                'event', CASE WHEN p_event_type IS NOT NULL THEN p_event END,
                'idempotency_key', p_idempotency_key, 'lease_epoch', p_lease_epoch,
                'timeout', CASE WHEN v_is_timeout THEN true END)),
            coalesce(p_event_id, gen_random_uuid()), p_causation_id, p_correlation_id,
            p_actor, p_traceparent, v_machine_version)
    RETURNING tx, pos INTO o_tx, o_pos;

    UPDATE pgstate.streams
       SET state = o_to_state, version = o_version, deadline_at = o_deadline_at,
           lease_epoch = o_lease_epoch, lease_owner = v_owner, lease_expires_at = v_expires,
           updated_at = v_now, last_tx = pg_current_xact_id()
     WHERE tenant = p_tenant AND stream_id = p_stream_id;

    IF p_idempotency_key IS NOT NULL THEN
        INSERT INTO pgstate.idempotency_keys (tenant, stream_id, key, request_hash, result)
        VALUES (p_tenant, p_stream_id, p_idempotency_key, v_hash,
                jsonb_build_object('from_state', o_from_state, 'to_state', o_to_state,
                                   'version', o_version, 'tx', o_tx::text, 'pos', o_pos,
                                   'lease_epoch', o_lease_epoch, 'deadline_at', o_deadline_at));
    END IF;
    RETURN (o_outcome, o_code, o_message, o_from_state, o_to_state, o_version,
            o_tx, o_pos, o_lease_epoch, o_deadline_at, o_lock_wait_us, o_detail)
           ::pgstate.transition_outcome;
END;
$$;

-- transition_v2: transition_v3 with OUT parameters, as the second release had it; kept for
-- SQL callers and for application code deployed before transition_v3.
CREATE OR REPLACE FUNCTION pgstate.transition_v2(
    p_tenant text, p_stream_id text, p_event text,
    p_expected_state text, p_expected_version bigint,
    p_idempotency_key text, p_actor jsonb, p_reason text, p_data jsonb,
    p_lease_epoch bigint, p_traceparent text,
    p_event_id uuid, p_causation_id uuid, p_correlation_id uuid,
    p_release_lease boolean, p_on_rejection text, p_event_type text,
    OUT o_outcome text, OUT o_code text, OUT o_message text,
    OUT o_from_state text, OUT o_to_state text, OUT o_version bigint,
    OUT o_tx xid8, OUT o_pos bigint, OUT o_lease_epoch bigint,
    OUT o_deadline_at timestamptz, OUT o_lock_wait_us bigint, OUT o_detail jsonb)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM pgstate.transition_v3(
        p_tenant, p_stream_id, p_event, p_expected_state, p_expected_version,
        p_idempotency_key, p_actor, p_reason, p_data, p_lease_epoch, p_traceparent,
        p_event_id, p_causation_id, p_correlation_id, p_release_lease, p_on_rejection,
        p_event_type);
$$;

-- The row append_one_v2 returns (a declared type: see transition_outcome).
CREATE TYPE pgstate.append_outcome AS (
    from_version bigint, to_version bigint, tx xid8, first_pos bigint, last_pos bigint,
    duplicate boolean);

-- append_one_v2: append_v1 for one event, the common call, with scalar arguments (no arrays
-- to build, send and unpack, and no per-array checks). It handles the plain case itself: a
-- well-formed event, a stream that is not a machine instance, the expected version met
-- and, for "any" and "exists", an event id not stored yet. It refuses a plain version
-- conflict (an exact version not met, by an event id not stored) with append_v1's error.
-- Everything else (bad input, a retry, a writer-order refusal) goes to append_v1, which
-- answers it exactly as it would have answered the batch of one.
CREATE FUNCTION pgstate.append_one_v2(
    p_tenant text, p_stream_id text, p_expected bigint,
    p_event_id uuid, p_type text, p_data text, p_metadata text,
    p_schema_version integer, p_causation_id uuid, p_correlation_id uuid,
    p_actor jsonb, p_traceparent text)
RETURNS pgstate.append_outcome
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
-- Every statement here is a keyed lookup: a young table's few pages must not get a scan
-- plan cached for the session.
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    v_current bigint;
    v_machine text;
    v_last_tx xid8;
    v_tx xid8;
    v_pos bigint;
    v_result pgstate.append_outcome;
    v_plain boolean;
BEGIN
    IF length(p_tenant) BETWEEN 1 AND 100 AND length(p_stream_id) BETWEEN 1 AND 200
       AND p_expected >= -2 AND p_event_id IS NOT NULL AND length(p_type) BETWEEN 1 AND 200
       AND left(ltrim(p_data, E' \t\n\r'), 1) = '{'
       AND left(ltrim(coalesce(p_metadata, '{}'), E' \t\n\r'), 1) = '{' THEN
        IF NOT pg_try_advisory_xact_lock(hashtextextended(p_tenant || '/' || p_stream_id, 0))
        THEN
            PERFORM pg_advisory_xact_lock(hashtextextended(p_tenant || '/' || p_stream_id, 0));
        END IF;
        SELECT s.version, s.machine, s.last_tx INTO v_current, v_machine, v_last_tx
          FROM pgstate.streams s
         WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id;
        v_plain := v_machine IS NULL AND coalesce(v_last_tx <= pg_current_xact_id(), true);
        -- The id probe is its own statement, run only for "any" and "exists": inside the
        -- expression above it made every call plan a custom plan (the planner folds the
        -- probe away when the version matches, so the generic plan always looked dearer).
        IF v_plain AND coalesce(v_current, 0) <> p_expected THEN
            v_plain := (p_expected = -1 OR (p_expected = -2 AND v_current IS NOT NULL))
                       AND NOT EXISTS (SELECT 1 FROM pgstate.events e
                                        WHERE e.event_id = p_event_id);
        END IF;
        IF v_plain THEN
            v_current := coalesce(v_current, 0);
            INSERT INTO pgstate.events (tenant, stream_id, version, category, type,
                                        schema_version, data, metadata, event_id,
                                        causation_id, correlation_id, actor, traceparent)
            VALUES (p_tenant, p_stream_id, v_current + 1, split_part(p_stream_id, '-', 1),
                    p_type, coalesce(p_schema_version, 1), p_data::jsonb,
                    coalesce(p_metadata::jsonb, '{}'::jsonb), p_event_id, p_causation_id,
                    p_correlation_id, p_actor, p_traceparent)
            RETURNING pos, events.tx INTO v_pos, v_tx;
            IF v_current = 0 THEN
                INSERT INTO pgstate.streams (tenant, stream_id, category, version)
                VALUES (p_tenant, p_stream_id, split_part(p_stream_id, '-', 1), 1);
            ELSE
                UPDATE pgstate.streams
                   SET version = v_current + 1, updated_at = clock_timestamp(), last_tx = v_tx
                 WHERE tenant = p_tenant AND stream_id = p_stream_id;
            END IF;
            RETURN (v_current + 1, v_current + 1, v_tx, v_pos, v_pos, false)
                   ::pgstate.append_outcome;
        END IF;
        -- A plain conflict, refused here exactly as append_v1 refuses it: an exact version
        -- the stream is not at, by an event whose id is not stored (so not a retry).
        IF v_machine IS NULL AND p_expected >= 0 AND coalesce(v_current, 0) <> p_expected
        THEN
            IF NOT EXISTS (SELECT 1 FROM pgstate.events e WHERE e.event_id = p_event_id) THEN
                PERFORM pgstate.raise_error('SM004',
                    format('stream %s is at version %s, expected %s', p_stream_id,
                           coalesce(v_current, 0),
                           CASE p_expected WHEN 0 THEN 'no stream' ELSE p_expected::text END),
                    pgstate.head_json(p_tenant, p_stream_id)
                        || jsonb_build_object('expected_version', p_expected));
            END IF;
        END IF;
    END IF;
    SELECT a.from_version, a.to_version, a.tx, a.first_pos, a.last_pos, a.duplicate
      INTO v_result
      FROM pgstate.append_v1(p_tenant, p_stream_id, p_expected, ARRAY[p_event_id],
                             ARRAY[p_type], ARRAY[p_data],
                             CASE WHEN p_metadata IS NOT NULL THEN ARRAY[p_metadata] END,
                             CASE WHEN p_schema_version IS NOT NULL
                                  THEN ARRAY[p_schema_version] END,
                             CASE WHEN p_causation_id IS NOT NULL
                                  THEN ARRAY[p_causation_id] END,
                             CASE WHEN p_correlation_id IS NOT NULL
                                  THEN ARRAY[p_correlation_id] END,
                             p_actor, p_traceparent) a;
    RETURN v_result;
END;
$$;

-- append_one_v1: append_one_v2 with OUT parameters, as the first release had it; kept for
-- SQL callers and for application code deployed before append_one_v2.
CREATE OR REPLACE FUNCTION pgstate.append_one_v1(
    p_tenant text, p_stream_id text, p_expected bigint,
    p_event_id uuid, p_type text, p_data text, p_metadata text,
    p_schema_version integer, p_causation_id uuid, p_correlation_id uuid,
    p_actor jsonb, p_traceparent text,
    OUT from_version bigint, OUT to_version bigint, OUT tx xid8,
    OUT first_pos bigint, OUT last_pos bigint, OUT duplicate boolean)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM pgstate.append_one_v2(
        p_tenant, p_stream_id, p_expected, p_event_id, p_type, p_data, p_metadata,
        p_schema_version, p_causation_id, p_correlation_id, p_actor, p_traceparent);
$$;

-- Roles for the host application: readers select, writers also execute the write
-- functions. Nobody but the owner may change the log; writes go through SECURITY DEFINER
-- functions. Roles are cluster-wide, so they are created only when missing and only when
-- the migrating user may create roles.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = current_user
                 AND (rolsuper OR rolcreaterole)) THEN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgstate_reader') THEN
            CREATE ROLE pgstate_reader NOLOGIN;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgstate_writer') THEN
            CREATE ROLE pgstate_writer NOLOGIN IN ROLE pgstate_reader;
        END IF;
    END IF;
END;
$$;

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
