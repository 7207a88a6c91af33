-- Leases: one owner at a time, fenced by an epoch that grows with every new owner (and
-- with every timeout edge), so a writer that lost its lease cannot land a write.
-- The stream's head row under its lock; SM001 when there is none.
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

-- The head row of an instance that may still take a lease: locked, a state-machine
-- instance (a lease on a plain stream would guard nothing), and not finished.
CREATE FUNCTION pgstate.lease_head(p_tenant text, p_stream_id text) RETURNS pgstate.streams
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

CREATE FUNCTION pgstate.check_lease_ttl(p_ttl_ms bigint) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_ttl_ms IS NULL OR p_ttl_ms NOT BETWEEN 1 AND 86400000 THEN
        PERFORM pgstate.raise_error('SM012', 'lease ttl must be 1 ms to 24 h',
            jsonb_build_object('field', 'ttl'));
    END IF;
END;
$$;

CREATE FUNCTION pgstate.check_lease_args(p_owner text, p_ttl_ms bigint) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_owner IS NULL OR length(p_owner) NOT BETWEEN 1 AND 200 THEN
        PERFORM pgstate.raise_error('SM012', 'lease owner must be 1 to 200 characters',
            jsonb_build_object('field', 'owner'));
    END IF;
    PERFORM pgstate.check_lease_ttl(p_ttl_ms);
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
    -- IS DISTINCT FROM: a NULL epoch must be refused, not make the test NULL.
    IF v_head.lease_owner IS DISTINCT FROM p_owner OR v_head.lease_epoch IS DISTINCT FROM p_epoch
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
    -- Not lease_head: a lease may be given up on a finished instance too.
    v_head := pgstate.locked_head(p_tenant, p_stream_id);
    IF v_head.lease_owner IS DISTINCT FROM p_owner
       OR v_head.lease_epoch IS DISTINCT FROM p_epoch THEN
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
