-- register_machine_v1: store a compiled definition. A definition registered before (as
-- any version: an older replica of a rolling deploy registers its own again) is a no-op
-- that answers with that version; anything else becomes the next version.
CREATE FUNCTION pgstate.register_machine_v1(p_name text, p_def_hash text, p_definition jsonb,
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
    -- Each edge joins two states of the definition, once per state and event, and leaves
    -- no final state: transition_v3 takes any edge it finds for legal.
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_definition -> 'edges') e
                WHERE jsonb_typeof(e) <> 'object'
                   OR jsonb_typeof(e -> 'from') IS DISTINCT FROM 'string'
                   OR jsonb_typeof(e -> 'to') IS DISTINCT FROM 'string'
                   OR jsonb_typeof(e -> 'event') IS DISTINCT FROM 'string'
                   OR NOT (p_definition -> 'states') ? (e ->> 'from')
                   OR NOT (p_definition -> 'states') ? (e ->> 'to')
                   OR p_definition -> 'states' -> (e ->> 'from') -> 'final' = 'true'::jsonb)
       OR EXISTS (SELECT 1 FROM jsonb_array_elements(p_definition -> 'edges') e
                   GROUP BY e ->> 'from', e ->> 'event' HAVING count(*) > 1) THEN
        PERFORM pgstate.raise_error('SM012',
            'each edge joins two states of the definition, once per state and event, and '
            'none leaves a final state',
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
CREATE FUNCTION pgstate.guard_failure(p_guard jsonb, p_data jsonb, p_actor jsonb) RETURNS text
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
