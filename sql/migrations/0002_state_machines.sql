-- State machines as data. Versions are immutable: a changed definition is a new version,
-- and every instance pins the version it was created under.
CREATE TABLE pgstate.machines (
    name          text        NOT NULL,
    version       integer     NOT NULL CHECK (version >= 1),
    def_hash      text        NOT NULL,
    definition    jsonb       NOT NULL,
    initial_state text        NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (name, version)
);

CREATE TABLE pgstate.machine_states (
    name        text    NOT NULL,
    version     integer NOT NULL,
    state       text    NOT NULL,
    final       boolean NOT NULL,
    timeout     interval,
    on_timeout  text,
    PRIMARY KEY (name, version, state),
    FOREIGN KEY (name, version) REFERENCES pgstate.machines (name, version)
);

CREATE TABLE pgstate.machine_edges (
    name           text    NOT NULL,
    version        integer NOT NULL,
    from_state     text    NOT NULL,
    event          text    NOT NULL,
    to_state       text    NOT NULL,
    requires_lease boolean NOT NULL DEFAULT false,
    guard          jsonb,
    PRIMARY KEY (name, version, from_state, event),
    FOREIGN KEY (name, version, from_state) REFERENCES pgstate.machine_states (name, version, state),
    FOREIGN KEY (name, version, to_state) REFERENCES pgstate.machine_states (name, version, state)
);

-- Idempotency keys are scoped to a stream: the stream lock serializes their checks.
CREATE TABLE pgstate.idempotency_keys (
    tenant       text        NOT NULL,
    stream_id    text        NOT NULL,
    key          text        NOT NULL,
    request_hash text        NOT NULL,
    result       jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant, stream_id, key)
);

-- Rejected attempts recorded by try_transition, for audit.
CREATE TABLE pgstate.rejections (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant          text        NOT NULL,
    stream_id       text        NOT NULL,
    event           text        NOT NULL,
    code            text        NOT NULL,
    message         text        NOT NULL,
    detail          jsonb       NOT NULL,
    actor           jsonb,
    reason          text,
    idempotency_key text,
    traceparent     text,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX rejections_stream_idx ON pgstate.rejections (tenant, stream_id, id);

-- Work finders: instances by state, and due deadlines for the sweeper.
CREATE INDEX streams_machine_state_idx ON pgstate.streams (tenant, machine, state, stream_id)
    WHERE machine IS NOT NULL;
CREATE INDEX streams_deadline_idx ON pgstate.streams (deadline_at)
    WHERE deadline_at IS NOT NULL;
-- register_machine_v1: store a compiled definition. The same definition as the newest
-- version is a no-op; anything else becomes the next version.
CREATE FUNCTION pgstate.register_machine_v1(p_name text, p_def_hash text, p_definition jsonb,
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
                                       requires_lease, guard)
    SELECT p_name, o_version, e ->> 'from', e ->> 'event', e ->> 'to',
           coalesce((e ->> 'requires_lease')::boolean, false),
           CASE WHEN jsonb_typeof(e -> 'guard') = 'object' THEN e -> 'guard' END
      FROM jsonb_array_elements(p_definition -> 'edges') e;
END;
$$;

-- Why a declarative guard refuses a request, or NULL when it passes.
CREATE FUNCTION pgstate.guard_failure(p_guard jsonb, p_data jsonb, p_actor jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_payload jsonb := p_guard -> 'payload';
    v_key     text;
    v_spec    jsonb;
BEGIN
    IF p_guard ? 'actor_kinds'
       AND NOT coalesce((p_guard -> 'actor_kinds') ? (p_actor ->> 'kind'), false) THEN
        RETURN format('actor kind %s is not one of %s',
                      coalesce(p_actor ->> 'kind', 'none'), p_guard -> 'actor_kinds');
    END IF;
    IF v_payload IS NULL THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(p_data) <> 'object' THEN
        RETURN 'payload must be a JSON object';
    END IF;
    FOR v_key IN SELECT jsonb_array_elements_text(coalesce(v_payload -> 'required', '[]'))
    LOOP
        IF NOT p_data ? v_key THEN
            RETURN format('payload lacks required key %s', v_key);
        END IF;
    END LOOP;
    FOR v_key, v_spec IN SELECT * FROM jsonb_each(coalesce(v_payload -> 'properties', '{}'))
    LOOP
        CONTINUE WHEN NOT p_data ? v_key;
        IF v_spec ? 'types'
           AND NOT (v_spec -> 'types') ? jsonb_typeof(p_data -> v_key) THEN
            RETURN format('payload key %s is %s, expected %s', v_key,
                          jsonb_typeof(p_data -> v_key), v_spec -> 'types');
        END IF;
        -- Exact equality: containment (@>) would also accept part of an array value.
        IF v_spec ? 'enum'
           AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(v_spec -> 'enum') allowed
                            WHERE allowed = p_data -> v_key) THEN
            RETURN format('payload key %s must be one of %s', v_key, v_spec -> 'enum');
        END IF;
    END LOOP;
    IF v_payload ->> 'additional' = 'false' THEN
        SELECT k INTO v_key FROM jsonb_object_keys(p_data) k
         WHERE NOT coalesce(v_payload -> 'properties', '{}') ? k LIMIT 1;
        IF v_key IS NOT NULL THEN
            RETURN format('payload key %s is not allowed', v_key);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

-- create_v1: start a machine instance in its initial state, pinned to a registered version
-- (the newest one with p_def_hash, or the newest of all when it is NULL).
CREATE FUNCTION pgstate.create_v1(
    p_tenant text, p_stream_id text, p_machine text, p_def_hash text, p_data jsonb,
    p_actor jsonb, p_event_id uuid, p_causation_id uuid, p_correlation_id uuid,
    p_traceparent text,
    OUT o_state text, OUT o_version bigint, OUT o_machine_version integer, OUT o_tx xid8,
    OUT o_pos bigint, OUT o_deadline_at timestamptz, OUT o_duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    v_timeout interval;
    v_first   record;
BEGIN
    PERFORM pgstate.check_stream_id(p_tenant, p_stream_id);
    SELECT m.version, m.initial_state INTO o_machine_version, o_state
      FROM pgstate.machines m
     WHERE m.name = p_machine AND (p_def_hash IS NULL OR m.def_hash = p_def_hash)
     ORDER BY m.version DESC LIMIT 1;
    IF NOT FOUND THEN
        PERFORM pgstate.raise_error('SM009',
            format('machine %s is not registered with this definition; register it first', p_machine),
            jsonb_build_object('machine', p_machine, 'def_hash', p_def_hash));
    END IF;

    PERFORM pgstate.lock_stream(p_tenant, p_stream_id);
    IF EXISTS (SELECT 1 FROM pgstate.streams s
                WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id) THEN
        SELECT e.event_id, e.tx, e.pos, e.data, s.machine, s.state, s.version,
               s.machine_version, s.deadline_at INTO v_first
          FROM pgstate.events e
          JOIN pgstate.streams s ON s.tenant = e.tenant AND s.stream_id = e.stream_id
         WHERE e.tenant = p_tenant AND e.stream_id = p_stream_id AND e.version = 1;
        IF p_event_id IS NOT NULL AND v_first.event_id = p_event_id THEN
            IF v_first.machine IS DISTINCT FROM p_machine
               OR v_first.data <> coalesce(p_data, '{}'::jsonb) THEN
                PERFORM pgstate.raise_error('SM006',
                    format('event id %s created %s with another machine or data', p_event_id,
                           p_stream_id),
                    pgstate.head_json(p_tenant, p_stream_id));
            END IF;
            -- A retry of the create that already landed: what the instance is now.
            o_state := v_first.state;
            o_version := v_first.version;
            o_machine_version := v_first.machine_version;
            o_deadline_at := v_first.deadline_at;
            o_tx := v_first.tx;
            o_pos := v_first.pos;
            o_duplicate := true;
            RETURN;
        END IF;
        PERFORM pgstate.raise_error('SM004', format('stream %s already exists', p_stream_id),
            pgstate.head_json(p_tenant, p_stream_id) || jsonb_build_object('expected_version', 0));
    END IF;

    SELECT st.timeout INTO v_timeout FROM pgstate.machine_states st
     WHERE st.name = p_machine AND st.version = o_machine_version AND st.state = o_state;
    o_deadline_at := clock_timestamp() + v_timeout;
    o_version := 1;
    o_duplicate := false;

    INSERT INTO pgstate.events (tenant, stream_id, version, category, type, data, metadata,
                                event_id, causation_id, correlation_id, actor, traceparent,
                                machine_version)
    VALUES (p_tenant, p_stream_id, 1, split_part(p_stream_id, '-', 1), '$created',
            coalesce(p_data, '{}'::jsonb),
            jsonb_build_object('machine', p_machine, 'to_state', o_state),
            coalesce(p_event_id, gen_random_uuid()), p_causation_id, p_correlation_id, p_actor,
            p_traceparent, o_machine_version)
    RETURNING tx, pos INTO o_tx, o_pos;

    INSERT INTO pgstate.streams (tenant, stream_id, category, version, state, machine,
                                 machine_version, deadline_at)
    VALUES (p_tenant, p_stream_id, split_part(p_stream_id, '-', 1), 1, o_state, p_machine,
            o_machine_version, o_deadline_at);
END;
$$;
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
-- Leases: one owner at a time, fenced by an epoch that grows with every new owner (and
-- with every timeout edge), so a writer that lost its lease cannot land a write.
CREATE FUNCTION pgstate.lease_head(p_tenant text, p_stream_id text) RETURNS pgstate.streams
LANGUAGE plpgsql AS $$
DECLARE
    v_head  pgstate.streams%ROWTYPE;
    v_final boolean;
BEGIN
    PERFORM pgstate.check_stream_id(p_tenant, p_stream_id);
    PERFORM pgstate.lock_stream(p_tenant, p_stream_id);
    SELECT * INTO v_head FROM pgstate.streams s
     WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id;
    IF NOT FOUND THEN
        PERFORM pgstate.raise_error('SM001', format('no stream %s', p_stream_id),
            pgstate.head_json(p_tenant, p_stream_id));
    END IF;
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

CREATE FUNCTION pgstate.check_lease_args(p_owner text, p_ttl_ms bigint) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_owner IS NULL OR length(p_owner) NOT BETWEEN 1 AND 200 THEN
        PERFORM pgstate.raise_error('SM012', 'lease owner must be 1 to 200 characters',
            jsonb_build_object('field', 'owner'));
    END IF;
    IF p_ttl_ms IS NULL OR p_ttl_ms NOT BETWEEN 1 AND 86400000 THEN
        PERFORM pgstate.raise_error('SM012', 'lease ttl must be 1 ms to 24 h',
            jsonb_build_object('field', 'ttl'));
    END IF;
END;
$$;

CREATE FUNCTION pgstate.acquire_lease_v1(p_tenant text, p_stream_id text, p_owner text,
    p_ttl_ms bigint, OUT o_epoch bigint, OUT o_expires_at timestamptz, OUT o_version bigint,
    OUT o_state text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    v_head pgstate.streams%ROWTYPE;
    v_now  timestamptz;
BEGIN
    PERFORM pgstate.check_lease_args(p_owner, p_ttl_ms);
    v_head := pgstate.lease_head(p_tenant, p_stream_id);
    v_now := clock_timestamp();
    IF v_head.lease_owner IS NOT NULL AND v_head.lease_expires_at > v_now THEN
        IF v_head.lease_owner <> p_owner THEN
            PERFORM pgstate.raise_error('SM010',
                format('%s holds the lease on %s', v_head.lease_owner, p_stream_id),
                pgstate.head_json(p_tenant, p_stream_id));
        END IF;
        o_epoch := v_head.lease_epoch;  -- the owner asking again keeps its epoch
    ELSE
        o_epoch := v_head.lease_epoch + 1;
    END IF;
    o_expires_at := v_now + make_interval(secs => p_ttl_ms / 1000.0);
    o_version := v_head.version;
    o_state := v_head.state;
    UPDATE pgstate.streams
       SET lease_owner = p_owner, lease_epoch = o_epoch, lease_expires_at = o_expires_at
     WHERE tenant = p_tenant AND stream_id = p_stream_id;
END;
$$;

CREATE FUNCTION pgstate.renew_lease_v1(p_tenant text, p_stream_id text, p_owner text,
    p_epoch bigint, p_ttl_ms bigint, OUT o_epoch bigint, OUT o_expires_at timestamptz,
    OUT o_version bigint, OUT o_state text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    v_head pgstate.streams%ROWTYPE;
    v_now  timestamptz;
BEGIN
    PERFORM pgstate.check_lease_args(p_owner, p_ttl_ms);
    v_head := pgstate.lease_head(p_tenant, p_stream_id);
    v_now := clock_timestamp();
    IF v_head.lease_owner IS DISTINCT FROM p_owner OR v_head.lease_epoch <> p_epoch
       OR v_head.lease_expires_at <= v_now THEN
        PERFORM pgstate.raise_error('SM005',
            format('%s no longer holds lease epoch %s on %s', p_owner, p_epoch, p_stream_id),
            pgstate.head_json(p_tenant, p_stream_id));
    END IF;
    o_epoch := p_epoch;
    o_expires_at := v_now + make_interval(secs => p_ttl_ms / 1000.0);
    o_version := v_head.version;
    o_state := v_head.state;
    UPDATE pgstate.streams SET lease_expires_at = o_expires_at
     WHERE tenant = p_tenant AND stream_id = p_stream_id;
END;
$$;

CREATE FUNCTION pgstate.release_lease_v1(p_tenant text, p_stream_id text, p_owner text,
    p_epoch bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    v_head pgstate.streams%ROWTYPE;
BEGIN
    PERFORM pgstate.check_lease_args(p_owner, 1);
    v_head := pgstate.lease_head(p_tenant, p_stream_id);
    IF v_head.lease_owner IS DISTINCT FROM p_owner OR v_head.lease_epoch <> p_epoch THEN
        PERFORM pgstate.raise_error('SM005',
            format('%s does not hold lease epoch %s on %s', p_owner, p_epoch, p_stream_id),
            pgstate.head_json(p_tenant, p_stream_id));
    END IF;
    UPDATE pgstate.streams SET lease_owner = NULL, lease_expires_at = NULL
     WHERE tenant = p_tenant AND stream_id = p_stream_id;
END;
$$;

-- fire_due_timeouts_v1: take due deadlines' timeout edges. A stream whose lock is busy is
-- skipped (try-lock, the advisory-lock form of SKIP LOCKED): a row lock here would deadlock
-- against transitions, which take the advisory lock first and the row lock second.
CREATE FUNCTION pgstate.fire_due_timeouts_v1(p_limit integer,
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
         WHERE s.deadline_at <= clock_timestamp()
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

-- migrate_instances_v1: move live instances of one machine version to another under
-- their locks, appending a '$migrated' event each. The state map must be total.
CREATE FUNCTION pgstate.migrate_instances_v1(p_tenant text, p_machine text,
    p_from_version integer, p_to_version integer, p_state_map jsonb, p_actor jsonb,
    p_after text, p_limit integer, OUT o_moved bigint, OUT o_last text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    v_map      jsonb;
    v_missing  jsonb;
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
    FOR v_stream IN
        SELECT s.stream_id FROM pgstate.streams s
          JOIN pgstate.machine_states st
            ON st.name = s.machine AND st.version = s.machine_version AND st.state = s.state
         WHERE s.tenant = p_tenant AND s.machine = p_machine
           AND s.machine_version = p_from_version AND NOT st.final
           AND (p_after IS NULL OR s.stream_id COLLATE "C" > p_after COLLATE "C")
         ORDER BY s.stream_id COLLATE "C"
         LIMIT p_limit
    LOOP
        o_last := v_stream;
        PERFORM pgstate.lock_stream(p_tenant, v_stream);
        SELECT * INTO v_head FROM pgstate.streams s
         WHERE s.tenant = p_tenant AND s.stream_id = v_stream;
        CONTINUE WHEN v_head.machine_version <> p_from_version;
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
        UPDATE pgstate.streams
           SET state = v_to_state, machine_version = p_to_version, version = v_head.version + 1,
               last_tx = pg_current_xact_id(),
               deadline_at = CASE WHEN v_to_state = v_head.state AND v_head.deadline_at IS NOT NULL
                                  THEN v_head.deadline_at
                                  ELSE clock_timestamp() + v_timeout END,
               updated_at = clock_timestamp()
         WHERE tenant = p_tenant AND stream_id = v_stream;
        o_moved := o_moved + 1;
    END LOOP;
END;
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
