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

-- transition_v2: transition_v3 with OUT parameters, as the second release had it; kept for
-- SQL callers and for application code deployed before transition_v3.
CREATE FUNCTION pgstate.transition_v2(
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

-- transition_v1: transition_v2 with a boolean choice between raising a rejection and
-- recording it, as the first release had it; kept for SQL callers.
CREATE FUNCTION pgstate.transition_v1(
    p_tenant text, p_stream_id text, p_event text,
    p_expected_state text, p_expected_version bigint,
    p_idempotency_key text, p_actor jsonb, p_reason text, p_data jsonb,
    p_lease_epoch bigint, p_traceparent text,
    p_event_id uuid, p_causation_id uuid, p_correlation_id uuid,
    p_release_lease boolean, p_raise boolean, p_event_type text,
    OUT o_outcome text, OUT o_code text, OUT o_message text,
    OUT o_from_state text, OUT o_to_state text, OUT o_version bigint,
    OUT o_tx xid8, OUT o_pos bigint, OUT o_lease_epoch bigint,
    OUT o_deadline_at timestamptz, OUT o_lock_wait_us bigint, OUT o_detail jsonb)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM pgstate.transition_v2(
        p_tenant, p_stream_id, p_event, p_expected_state, p_expected_version,
        p_idempotency_key, p_actor, p_reason, p_data, p_lease_epoch, p_traceparent,
        p_event_id, p_causation_id, p_correlation_id, p_release_lease,
        CASE WHEN p_raise THEN 'raise' ELSE 'record' END, p_event_type);
$$;
