-- Fixes from a review of the machine and append functions; no table changes.
--
-- fire_due_timeouts_v1: no idempotency key. It passed 'timeout:<stream>:<version>', in the
-- namespace clients use for theirs: a client transition with that key on the same stream
-- blocked the timeout for good (a recorded SM006 on every sweep). The key guarded nothing:
-- the sweeper takes the stream lock and re-reads the version before it fires.
-- replay_append: a retry must repeat the batch in its order; the same ids in another order
-- were taken for the stored request.
-- register_machine_v1: a definition registered before as any version answers with that
-- version (an old replica of a rolling deploy no longer adds a copy as the newest
-- version); a timeout beyond 36500 days is refused (the deadline would leave the server's
-- timestamp range and every create into that state would fail).
-- guard_failure: an actor kind must be a JSON string (1 or true matched "1" or "true").
-- create_v1: a retry of a create (same event id) that names another definition is SM006,
-- not the instance created with the first one.
-- lease_head: leases only on state-machine instances (SM001 on a plain stream).
-- migrate_instances_v1: refuses a migration from a version to itself, and a state map key
-- that names no state of the old version.
-- register_machine_v1 also refuses a def_hash stored with another definition (the hash is
-- the client's word: whoever registered first would otherwise decide what later
-- registrations' instances follow), state rules of the wrong JSON type (a string "true"
-- passed the checks and was cast later) and a final state with a timeout; the sweeper skips
-- final states (such a timeout could never fire, and every sweep tried it again).
-- set_notify_mode_v1: no table lock when the mode is unchanged (the trigger's state, not
-- only the config row).
-- save_snapshot_v1: only at a version the stream has reached.
-- save_checkpoint_v1, park_event_v1: fenced by the epoch alone. A page that outlasted the
-- lease was refused at its commit although its fence had held the checkpoint row all
-- along (nobody could have claimed it), so a slow page was rolled back forever.

-- A retry of an append whose events are already stored: return the original result when
-- the stored events are the same ones (ids, stream, order, type, data), otherwise raise.
CREATE OR REPLACE FUNCTION pgstate.replay_append(
    p_tenant text, p_stream_id text, p_expected bigint,
    p_event_ids uuid[], p_types text[], p_data text[],
    OUT from_version bigint, OUT to_version bigint, OUT tx xid8,
    OUT first_pos bigint, OUT last_pos bigint, OUT duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_found   integer;
    v_matches integer;
    v_offsets integer;
BEGIN
    -- A retry repeats the whole batch, so its first id decides; one index probe instead of
    -- one per event on every append that is not a retry.
    IF NOT EXISTS (SELECT 1 FROM pgstate.events e WHERE e.event_id = p_event_ids[1]) THEN
        duplicate := NULL;  -- not a retry
        RETURN;
    END IF;
    -- One distinct (version - place in the batch) when the stored versions follow the
    -- batch's order: the same ids in another order are another request.
    SELECT count(*),
           count(*) FILTER (WHERE e.tenant = p_tenant AND e.stream_id = p_stream_id
                              AND e.type = u.type AND e.data = u.data::jsonb),
           count(DISTINCT e.version - u.place),
           min(e.version), max(e.version), min(e.tx), min(e.pos), max(e.pos)
      INTO v_found, v_matches, v_offsets, from_version, to_version, tx, first_pos, last_pos
      FROM unnest(p_event_ids, p_types, p_data) WITH ORDINALITY AS u(id, type, data, place)
      JOIN pgstate.events e ON e.event_id = u.id;
    IF v_found = 0 THEN
        duplicate := NULL;  -- not a retry
        RETURN;
    END IF;
    IF v_found <> cardinality(p_event_ids) OR v_matches <> v_found OR v_offsets <> 1
       OR to_version - from_version + 1 <> v_found
       OR (p_expected >= 0 AND from_version <> p_expected + 1) THEN
        PERFORM pgstate.raise_error('SM006',
            'event ids already stored with a different stream, position or body',
            pgstate.head_json(p_tenant, p_stream_id)
                || jsonb_build_object('event_ids', to_jsonb(p_event_ids)));
    END IF;
    duplicate := true;
END;
$$;

-- register_machine_v1: store a compiled definition. A definition registered before (as
-- any version: an older replica of a rolling deploy registers its own again) is a no-op
-- that answers with that version; anything else becomes the next version.
CREATE OR REPLACE FUNCTION pgstate.register_machine_v1(p_name text, p_def_hash text, p_definition jsonb,
    OUT o_version integer, OUT o_created boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_stored jsonb;
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
    SELECT m.version, m.definition INTO o_version, v_stored
      FROM pgstate.machines m WHERE m.name = p_name AND m.def_hash = p_def_hash
     ORDER BY m.version DESC LIMIT 1;
    IF FOUND THEN
        -- The hash is the client's word: a definition stored under it must be this one, or
        -- whoever registered first (anyone can compute a class's hash) would decide what
        -- the instances of every later registration follow.
        IF v_stored <> p_definition THEN
            PERFORM pgstate.raise_error('SM006',
                format('machine %s version %s has this def_hash and another definition',
                       p_name, o_version),
                jsonb_build_object('machine', p_name, 'version', o_version));
        END IF;
        o_created := false;
        RETURN;
    END IF;
    SELECT max(m.version) INTO o_version FROM pgstate.machines m WHERE m.name = p_name;
    -- The state rules' types first: the inserts below cast them, so a string "true" or
    -- "1" would otherwise pass every check written for a JSON boolean or number.
    IF EXISTS (SELECT 1 FROM jsonb_each(p_definition -> 'states') s
                WHERE jsonb_typeof(s.value) <> 'object'
                   OR coalesce(jsonb_typeof(s.value -> 'final'), 'null')
                      NOT IN ('boolean', 'null')
                   OR coalesce(jsonb_typeof(s.value -> 'timeout_ms'), 'null')
                      NOT IN ('number', 'null')) THEN
        PERFORM pgstate.raise_error('SM012',
            'each state is an object with a boolean final and a numeric timeout_ms',
            jsonb_build_object('field', 'definition'));
    END IF;
    -- A deadline is a timestamp: a timeout beyond 100 years would put every instance that
    -- enters the state out of the server's range.
    IF EXISTS (SELECT 1 FROM jsonb_each(p_definition -> 'states') s
                WHERE jsonb_typeof(s.value -> 'timeout_ms') = 'number'
                  AND (s.value -> 'timeout_ms')::numeric NOT BETWEEN 1 AND 3153600000000) THEN
        PERFORM pgstate.raise_error('SM012', 'a timeout must be 1 ms to 36500 days',
            jsonb_build_object('field', 'definition'));
    END IF;
    -- A final state never moves again: a timeout there could never fire, and every sweep
    -- would try it again.
    IF EXISTS (SELECT 1 FROM jsonb_each(p_definition -> 'states') s
                WHERE s.value -> 'final' = 'true'::jsonb
                  AND jsonb_typeof(s.value -> 'timeout_ms') = 'number') THEN
        PERFORM pgstate.raise_error('SM012', 'a final state cannot have a timeout',
            jsonb_build_object('field', 'definition'));
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

-- Why a declarative guard refuses a request, or NULL when it passes.
CREATE OR REPLACE FUNCTION pgstate.guard_failure(p_guard jsonb, p_data jsonb, p_actor jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_payload jsonb := p_guard -> 'payload';
    v_key     text;
    v_spec    jsonb;
BEGIN
    -- A kind is a JSON string: ->> would also turn 1 or true into a text that matches.
    IF p_guard ? 'actor_kinds'
       AND NOT coalesce(jsonb_typeof(p_actor -> 'kind') = 'string'
                        AND (p_guard -> 'actor_kinds') ? (p_actor ->> 'kind'), false) THEN
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
CREATE OR REPLACE FUNCTION pgstate.create_v1(
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
               s.machine_version, s.deadline_at, created_as.def_hash INTO v_first
          FROM pgstate.events e
          JOIN pgstate.streams s ON s.tenant = e.tenant AND s.stream_id = e.stream_id
          LEFT JOIN pgstate.machines created_as
                 ON created_as.name = s.machine AND created_as.version = e.machine_version
         WHERE e.tenant = p_tenant AND e.stream_id = p_stream_id AND e.version = 1;
        IF p_event_id IS NOT NULL AND v_first.event_id = p_event_id THEN
            -- The definition it was created with (the event's version: a migration may
            -- have moved the instance on since), when the retry names one.
            IF v_first.machine IS DISTINCT FROM p_machine
               OR v_first.data <> coalesce(p_data, '{}'::jsonb)
               OR v_first.def_hash IS DISTINCT FROM coalesce(p_def_hash, v_first.def_hash) THEN
                PERFORM pgstate.raise_error('SM006',
                    format('event id %s created %s with another machine, definition or data',
                           p_event_id,
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

-- The head row of an instance that may still take a lease: locked, a state-machine
-- instance (a lease on a plain stream would guard nothing), and not finished.
CREATE OR REPLACE FUNCTION pgstate.lease_head(p_tenant text, p_stream_id text) RETURNS pgstate.streams
LANGUAGE plpgsql AS $$
DECLARE
    v_head  pgstate.streams%ROWTYPE;
    v_final boolean;
BEGIN
    v_head := pgstate.locked_head(p_tenant, p_stream_id);
    IF v_head.machine IS NULL THEN
        PERFORM pgstate.raise_error('SM001',
            format('no state-machine instance %s', p_stream_id),
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

-- fire_due_timeouts_v1: take due deadlines' timeout edges. A stream whose lock is busy is
-- skipped (try-lock, the advisory-lock form of SKIP LOCKED): a row lock here would deadlock
-- against transitions, which take the advisory lock first and the row lock second.
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
           AND NOT st.final
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
            -- No idempotency key: the lock and the version re-read above already make a
            -- second firing impossible, and a key here would share the clients' namespace.
            NULL,
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
-- their locks, appending a '$migrated' event each. A state kept under its name maps to
-- itself; the map must take every other state of the old version (final ones too) to a
-- state of the new version.
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
    IF p_from_version = p_to_version THEN
        PERFORM pgstate.raise_error('SM012',
            format('instances migrate between two versions, not from version %s to itself',
                   p_from_version),
            jsonb_build_object('field', 'to_version'));
    END IF;
    IF jsonb_typeof(coalesce(p_state_map, '{}'::jsonb)) <> 'object' THEN
        PERFORM pgstate.raise_error('SM012', 'state map must be a JSON object',
            jsonb_build_object('field', 'state_map'));
    END IF;
    -- A key that names no state of the old version is a typo, not a no-op.
    SELECT jsonb_agg(k ORDER BY k) INTO v_missing
      FROM jsonb_object_keys(coalesce(p_state_map, '{}'::jsonb)) k
     WHERE NOT EXISTS (SELECT 1 FROM pgstate.machine_states a
                        WHERE a.name = p_machine AND a.version = p_from_version
                          AND a.state = k);
    IF v_missing IS NOT NULL THEN
        PERFORM pgstate.raise_error('SM012',
            format('the state map names states %s that version %s does not have',
                   v_missing, p_from_version),
            jsonb_build_object('field', 'state_map', 'unknown', v_missing));
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

-- Advance a checkpoint: only forward, only by the current epoch's owner. Call it in
-- the transaction that wrote the projection's rows, so both commit or neither does.
CREATE OR REPLACE FUNCTION pgstate.save_checkpoint_v1(p_projection text, p_member integer, p_epoch bigint,
    p_tx xid8, p_pos bigint, p_ttl_ms bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row pgstate.checkpoints%ROWTYPE;
    v_now timestamptz := clock_timestamp();
BEGIN
    SELECT * INTO v_row FROM pgstate.checkpoints c
     WHERE c.projection = p_projection AND c.member = p_member FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM pgstate.raise_error('SM001', format('no projection %s member %s', p_projection, p_member),
            jsonb_build_object('projection', p_projection, 'member', p_member));
    END IF;
    -- The epoch fences, not the clock: a worker whose page outlasted its lease still owns
    -- the checkpoint if nobody claimed it since (its fence has held the row all along), and
    -- refusing it would roll back every long page forever.
    IF v_row.epoch <> p_epoch THEN
        PERFORM pgstate.raise_error('SM005',
            format('projection %s member %s: epoch %s is stale (current %s)',
                   p_projection, p_member, p_epoch, v_row.epoch),
            jsonb_build_object('projection', p_projection, 'member', p_member,
                               'lease_owner', v_row.owner, 'lease_epoch', v_row.epoch));
    END IF;
    IF (p_tx, p_pos) < (v_row.tx, v_row.pos) THEN
        PERFORM pgstate.raise_error('SM012',
            format('checkpoint of %s may not move back from %s:%s to %s:%s', p_projection,
                   v_row.tx, v_row.pos, p_tx, p_pos),
            jsonb_build_object('field', 'position'));
    END IF;
    UPDATE pgstate.checkpoints
       SET tx = p_tx, pos = p_pos, updated_at = v_now,
           lease_expires_at = v_now + make_interval(secs => p_ttl_ms / 1000.0)
     WHERE projection = p_projection AND member = p_member;
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.park_event_v1(p_projection text, p_member integer, p_epoch bigint,
    p_tx xid8, p_pos bigint, p_error text, p_attempts integer) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Same fencing as the checkpoint: only the owner's epoch may park.
    IF NOT EXISTS (SELECT 1 FROM pgstate.checkpoints c
                    WHERE c.projection = p_projection AND c.member = p_member
                      AND c.epoch = p_epoch) THEN
        PERFORM pgstate.raise_error('SM005',
            format('projection %s member %s: epoch %s is stale', p_projection,
                   p_member, p_epoch),
            jsonb_build_object('projection', p_projection, 'member', p_member));
    END IF;
    INSERT INTO pgstate.parked_events (projection, tx, pos, stream_id, version, error, attempts)
    SELECT p_projection, e.tx, e.pos, e.stream_id, e.version, left(p_error, 4000), p_attempts
      FROM pgstate.events e WHERE e.tx = p_tx AND e.pos = p_pos
    ON CONFLICT (projection, tx, pos)
    DO UPDATE SET error = excluded.error, attempts = excluded.attempts,
                  parked_at = excluded.parked_at;
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.set_notify_mode_v1(p_mode text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_mode NOT IN ('commit', 'relay') THEN
        PERFORM pgstate.raise_error('SM012', 'notify mode is commit or relay',
            jsonb_build_object('field', 'mode', 'value', p_mode));
    END IF;
    -- Unchanged: nothing to do, and no table lock on the log (ALTER TABLE would hold one
    -- that stops every append until this transaction ends). The trigger is the truth, not
    -- the config row: a restore with triggers disabled and enabled again turns it on.
    IF EXISTS (SELECT 1 FROM pg_trigger t
                WHERE t.tgrelid = 'pgstate.events'::regclass AND t.tgname = 'events_notify'
                  AND t.tgenabled = CASE p_mode WHEN 'commit' THEN 'O' ELSE 'D' END)
       AND EXISTS (SELECT 1 FROM pgstate.config
                    WHERE key = 'notify_mode' AND value = p_mode) THEN
        RETURN;
    END IF;
    IF p_mode = 'commit' THEN
        ALTER TABLE pgstate.events ENABLE TRIGGER events_notify;
    ELSE
        ALTER TABLE pgstate.events DISABLE TRIGGER events_notify;
    END IF;
    UPDATE pgstate.config SET value = p_mode WHERE key = 'notify_mode';
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.save_snapshot_v1(p_tenant text, p_stream_id text, p_fold_hash text,
    p_version bigint, p_state jsonb) RETURNS void
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    -- Only a version the stream has reached: a snapshot "from the future" would stand in
    -- for every event up to it.
    INSERT INTO pgstate.snapshots (tenant, stream_id, fold_hash, version, state)
    SELECT p_tenant, p_stream_id, p_fold_hash, p_version, p_state
     WHERE p_version >= 1
       AND EXISTS (SELECT 1 FROM pgstate.streams s
                    WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id
                      AND s.version >= p_version)
    ON CONFLICT (tenant, stream_id, fold_hash) DO UPDATE
       SET version = excluded.version, state = excluded.state, created_at = clock_timestamp()
     WHERE pgstate.snapshots.version < excluded.version;
$$;
