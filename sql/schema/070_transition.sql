-- transition_v1: one state-machine step, checked and applied in one transaction.
-- Check order (the design): stream lock; idempotency key; instance; terminal state;
-- deadline; lease and fencing epoch; expected state and version; legal edge; guard.
-- p_event_type names the stored event (default: the machine event's name).
-- With p_raise false a rejection is returned (outcome 'rejected') and recorded for audit
-- instead of raised.
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
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    v_started        timestamptz;
    v_now            timestamptz;
    v_head           record;
    v_hash           text;
    v_stored_hash    text;
    v_stored         jsonb;
    v_is_timeout     boolean;
    v_lease_live     boolean;
    v_guard_error    text;
    v_owner          text;
    v_expires        timestamptz;
BEGIN
    IF p_tenant IS NULL OR length(p_tenant) NOT BETWEEN 1 AND 100
       OR p_stream_id IS NULL OR length(p_stream_id) NOT BETWEEN 1 AND 200 THEN
        PERFORM pgstate.check_stream_id(p_tenant, p_stream_id);  -- raises the precise error
    END IF;
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
    IF p_data IS NOT NULL AND jsonb_typeof(p_data) <> 'object' THEN
        PERFORM pgstate.raise_error('SM012', 'data must be a JSON object',
            jsonb_build_object('field', 'data'));
    END IF;

    v_started := clock_timestamp();
    PERFORM pg_advisory_xact_lock(hashtextextended(p_tenant || '/' || p_stream_id, 0));
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
                    RETURN;
                END IF;
                o_code := 'SM006';
                o_message := format('idempotency key %s was used for a different request',
                                    p_idempotency_key);
                EXIT checks;
            END IF;
        END IF;

        -- 2. The instance and its current state's rules.
        -- One statement for the head row and the rules of its current state and event.
        SELECT s.state, s.version, s.category, s.machine, s.machine_version, s.lease_owner,
               s.lease_epoch, s.lease_expires_at, s.deadline_at, s.last_tx, st.final,
               st.on_timeout,
               e.requires_lease, e.guard, target.timeout AS target_timeout, e.to_state,
               e.event IS NOT NULL AS edge_found
          INTO v_head
          FROM pgstate.streams s
          LEFT JOIN pgstate.machine_states st
                 ON st.name = s.machine AND st.version = s.machine_version
                AND st.state = s.state
          LEFT JOIN pgstate.machine_edges e
                 ON e.name = st.name AND e.version = st.version
                AND e.from_state = st.state AND e.event = p_event
          LEFT JOIN pgstate.machine_states target
                 ON target.name = e.name AND target.version = e.version
                AND target.state = e.to_state
         WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id;
        IF NOT FOUND OR v_head.machine IS NULL THEN
            o_code := 'SM001';
            o_message := format('no state-machine instance %s', p_stream_id);
            EXIT checks;
        END IF;
        o_to_state := v_head.to_state;
        IF v_head.final THEN
            o_code := 'SM008';
            o_message := format('%s is in final state %s', p_stream_id, v_head.state);
            EXIT checks;
        END IF;

        -- 3. Deadline, on the clock (not the transaction start): no sweeper needs to have run.
        v_is_timeout := v_head.deadline_at IS NOT NULL AND v_head.deadline_at <= v_now
                        AND v_head.on_timeout = p_event;
        IF v_head.deadline_at <= v_now AND NOT v_is_timeout THEN
            o_code := 'SM007';
            o_message := format('the deadline of state %s passed at %s', v_head.state,
                                v_head.deadline_at);
            EXIT checks;
        END IF;

        -- 4. Lease and fencing epoch. A due timeout edge overrides any lease.
        IF NOT v_is_timeout THEN
            v_lease_live := v_head.lease_owner IS NOT NULL AND v_head.lease_expires_at > v_now;
            IF p_lease_epoch IS NOT NULL THEN
                IF p_lease_epoch <> v_head.lease_epoch OR NOT v_lease_live THEN
                    o_code := 'SM005';
                    o_message := format('lease epoch %s is stale or expired (current epoch %s)',
                                        p_lease_epoch, v_head.lease_epoch);
                    EXIT checks;
                END IF;
            ELSIF v_lease_live THEN
                o_code := 'SM010';
                o_message := format('%s holds the lease on %s', v_head.lease_owner, p_stream_id);
                EXIT checks;
            ELSIF coalesce(v_head.requires_lease, false) THEN
                o_code := 'SM005';
                o_message := format('event %s requires a lease', p_event);
                EXIT checks;
            END IF;
        END IF;

        -- 5. State and version both, so A -> B -> A cannot pass for "unchanged".
        IF p_expected_state IS NOT NULL AND p_expected_state <> v_head.state THEN
            o_code := 'SM003';
            o_message := format('%s is in state %s, expected %s', p_stream_id, v_head.state,
                                p_expected_state);
            EXIT checks;
        END IF;
        IF p_expected_version IS NOT NULL AND p_expected_version <> v_head.version THEN
            o_code := 'SM004';
            o_message := format('%s is at version %s, expected %s', p_stream_id,
                                v_head.version, p_expected_version);
            EXIT checks;
        END IF;

        -- 6. The edge and its guard.
        IF NOT v_head.edge_found THEN
            o_code := 'SM002';
            o_message := format('no transition %s from state %s', p_event, v_head.state);
            EXIT checks;
        END IF;
        -- A due timeout edge is the system's, not a request: no guard applies to it.
        IF v_head.guard IS NOT NULL AND NOT v_is_timeout THEN
            v_guard_error := pgstate.guard_failure(v_head.guard, coalesce(p_data, '{}'::jsonb),
                                                   p_actor);
            IF v_guard_error IS NOT NULL THEN
                o_code := 'SM011';
                o_message := v_guard_error;
                EXIT checks;
            END IF;
        END IF;
    END;

    IF o_code IS NOT NULL THEN
        o_detail := pgstate.head_json(p_tenant, p_stream_id)
            || jsonb_build_object('event', p_event, 'expected_state', p_expected_state,
                                  'expected_version', p_expected_version,
                                  'given_lease_epoch', p_lease_epoch);
        IF p_raise THEN
            PERFORM pgstate.raise_error(o_code, o_message, o_detail);
        END IF;
        INSERT INTO pgstate.rejections (tenant, stream_id, event, code, message, detail, actor,
                                        reason, idempotency_key, traceparent)
        VALUES (p_tenant, p_stream_id, p_event, o_code, o_message, o_detail, p_actor, p_reason,
                p_idempotency_key, p_traceparent);
        -- The detail holds the head row whether or not the checks got as far as reading it.
        o_outcome := 'rejected';
        o_from_state := o_detail ->> 'state';
        o_to_state := NULL;
        o_version := (o_detail ->> 'version')::bigint;
        o_lease_epoch := (o_detail ->> 'lease_epoch')::bigint;
        o_deadline_at := (o_detail ->> 'deadline_at')::timestamptz;
        RETURN;
    END IF;

    -- 7. Apply: the event, the head row and the idempotency row, all in this transaction.
    IF v_head.last_tx > pg_current_xact_id() THEN
        PERFORM pgstate.check_writer_order(p_tenant, p_stream_id, v_head.last_tx);
    END IF;
    o_outcome := 'applied';
    o_from_state := v_head.state;
    o_version := v_head.version + 1;
    o_lease_epoch := v_head.lease_epoch;
    v_owner := v_head.lease_owner;
    v_expires := v_head.lease_expires_at;
    IF v_is_timeout THEN
        -- The timeout fences whoever held the lease: their epoch is now stale.
        o_lease_epoch := o_lease_epoch + 1;
        v_owner := NULL;
        v_expires := NULL;
    ELSIF p_release_lease AND p_lease_epoch IS NOT NULL THEN
        v_owner := NULL;
        v_expires := NULL;
    END IF;
    o_deadline_at := v_now + v_head.target_timeout;

    INSERT INTO pgstate.events (tenant, stream_id, version, category, type, data, metadata,
                                event_id, causation_id, correlation_id, actor, traceparent,
                                machine_version)
    VALUES (p_tenant, p_stream_id, o_version, v_head.category, coalesce(p_event_type, p_event),
            coalesce(p_data, '{}'::jsonb),
            jsonb_strip_nulls(jsonb_build_object(
                'from_state', o_from_state, 'to_state', o_to_state, 'reason', p_reason,
                'event', CASE WHEN p_event_type IS NOT NULL THEN p_event END,
                'idempotency_key', p_idempotency_key, 'lease_epoch', p_lease_epoch,
                'timeout', CASE WHEN v_is_timeout THEN true END)),
            coalesce(p_event_id, gen_random_uuid()), p_causation_id, p_correlation_id,
            p_actor, p_traceparent, v_head.machine_version)
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
END;
$$;
