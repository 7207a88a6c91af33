-- The operator's calls leave pgstate_writer for a role of their own, pgstate_admin (a
-- member of pgstate_writer). They change what the application's own calls enforce:
-- migrate_instances_v1 moves instances to any state of another version without an edge,
-- set_notify_mode_v1 takes a table lock on the log and changes its trigger,
-- unpark_event_v1 drops a parked event, and a forced projection claim fences a live
-- worker out. The application role keeps everything its writes, reads, leases, workers,
-- sweeper and registrations need.
--
-- The forced claim was a parameter of the workers' own claim; it is now its own function,
-- take_over_projection_v1. Both share a new internal function, claim_projection, which
-- starts with no grants (renaming the old function would have carried its grants along).
--
-- A NULL epoch (or position) no longer passes the fencing checks of renew_lease_v1,
-- release_lease_v1, save_checkpoint_v1 and fence_projection_v1: the comparisons were "<>",
-- which a NULL turns into NULL, so the refusal was skipped. save_checkpoint_v1 and
-- fence_projection_v1 check the lease's TTL as claims do (1 ms to 24 h).
--
-- register_machine_v1 refuses edges to or from states the definition lacks, two edges for
-- one state and event, and edges out of a final state (definitions sent through SQL; the
-- Python classes and documents refused them already).
--
-- set_notify_mode_v1 takes the table lock its ALTER TABLE needs with NOWAIT, retrying for
-- up to 5 s: a waiting ALTER TABLE queued every append behind it while any transaction
-- that wrote the log stayed open.

-- CREATE ROLE ... IN ROLE needs ADMIN on pgstate_writer since PostgreSQL 16, which a
-- CREATEROLE migrator lacks if another role created pgstate_writer: then there is no
-- pgstate_admin, and the operator's calls stay with the owner.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = current_user
                 AND (rolsuper OR rolcreaterole))
       AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgstate_writer')
       AND NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgstate_admin') THEN
        BEGIN
            CREATE ROLE pgstate_admin NOLOGIN IN ROLE pgstate_writer;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE NOTICE 'pgstate_admin not created: %', SQLERRM;
        END;
    END IF;
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

CREATE OR REPLACE FUNCTION pgstate.check_lease_args(p_owner text, p_ttl_ms bigint) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_owner IS NULL OR length(p_owner) NOT BETWEEN 1 AND 200 THEN
        PERFORM pgstate.raise_error('SM012', 'lease owner must be 1 to 200 characters',
            jsonb_build_object('field', 'owner'));
    END IF;
    PERFORM pgstate.check_lease_ttl(p_ttl_ms);
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.renew_lease_v1(p_tenant text, p_stream_id text, p_owner text,
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

-- Internal: the claim of claim_projection_v1 and take_over_projection_v1. p_force takes
-- the checkpoint over from a live owner (rebuilds do), fencing it by epoch.
CREATE FUNCTION pgstate.claim_projection(p_projection text, p_member integer,
    p_members integer, p_owner text, p_ttl_ms bigint, p_force boolean,
    OUT o_epoch bigint, OUT o_tx xid8, OUT o_pos bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row pgstate.checkpoints%ROWTYPE;
    v_now timestamptz := clock_timestamp();
BEGIN
    PERFORM pgstate.check_lease_args(p_owner, p_ttl_ms);
    IF p_projection IS NULL OR length(p_projection) NOT BETWEEN 1 AND 200
       OR p_members IS NULL OR p_members < 1 OR p_member IS NULL
       OR p_member < 0 OR p_member >= p_members THEN
        PERFORM pgstate.raise_error('SM012', 'projection name, member and members are invalid',
            jsonb_build_object('field', 'projection'));
    END IF;
    -- One group size per projection: members of different splits would handle the same
    -- stream twice. The lock makes the check and the insert one step.
    PERFORM pg_advisory_xact_lock(hashtextextended('pgstate-projection/' || p_projection, 0));
    IF EXISTS (SELECT 1 FROM pgstate.checkpoints c
                WHERE c.projection = p_projection AND c.members <> p_members) THEN
        PERFORM pgstate.raise_error('SM012',
            format('projection %s already runs with another number of members', p_projection),
            jsonb_build_object('field', 'members', 'projection', p_projection));
    END IF;
    INSERT INTO pgstate.checkpoints (projection, member, members)
    VALUES (p_projection, p_member, p_members)
    ON CONFLICT (projection, member) DO NOTHING;
    SELECT * INTO v_row FROM pgstate.checkpoints c
     WHERE c.projection = p_projection AND c.member = p_member FOR UPDATE;
    IF v_row.members <> p_members THEN
        PERFORM pgstate.raise_error('SM012',
            format('projection %s runs with %s members, not %s', p_projection, v_row.members,
                   p_members),
            jsonb_build_object('field', 'members', 'members', v_row.members));
    END IF;
    IF v_row.owner IS NOT NULL AND v_row.owner <> p_owner AND v_row.lease_expires_at > v_now
       AND NOT coalesce(p_force, false) THEN
        PERFORM pgstate.raise_error('SM010',
            format('%s holds projection %s member %s', v_row.owner, p_projection, p_member),
            jsonb_build_object('projection', p_projection, 'member', p_member,
                               'lease_owner', v_row.owner, 'lease_epoch', v_row.epoch,
                               'lease_expires_at', v_row.lease_expires_at));
    END IF;
    o_epoch := CASE WHEN v_row.owner = p_owner AND v_row.lease_expires_at > v_now
                    THEN v_row.epoch ELSE v_row.epoch + 1 END;
    UPDATE pgstate.checkpoints
       SET owner = p_owner, epoch = o_epoch,
           lease_expires_at = v_now + make_interval(secs => p_ttl_ms / 1000.0),
           updated_at = v_now
     WHERE projection = p_projection AND member = p_member;
    o_tx := v_row.tx;
    o_pos := v_row.pos;
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.claim_projection_v1(p_projection text, p_member integer,
    p_members integer, p_owner text, p_ttl_ms bigint, p_force boolean,
    OUT o_epoch bigint, OUT o_tx xid8, OUT o_pos bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF coalesce(p_force, false) THEN
        RAISE EXCEPTION 'taking a projection over from a live worker is an operator call: '
                        'take_over_projection_v1, as pgstate_admin'
            USING ERRCODE = '42501';
    END IF;
    SELECT c.o_epoch, c.o_tx, c.o_pos INTO o_epoch, o_tx, o_pos
      FROM pgstate.claim_projection(p_projection, p_member, p_members, p_owner, p_ttl_ms,
                                    false) c;
END;
$$;

-- A rebuild's claim: the checkpoint is taken from any live owner, whose next page is then
-- refused by its stale epoch.
CREATE FUNCTION pgstate.take_over_projection_v1(p_projection text, p_member integer,
    p_members integer, p_owner text, p_ttl_ms bigint,
    OUT o_epoch bigint, OUT o_tx xid8, OUT o_pos bigint)
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.o_epoch, c.o_tx, c.o_pos
      FROM pgstate.claim_projection(p_projection, p_member, p_members, p_owner, p_ttl_ms,
                                    true) c;
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
    PERFORM pgstate.check_lease_ttl(p_ttl_ms);
    IF p_tx IS NULL OR p_pos IS NULL THEN
        PERFORM pgstate.raise_error('SM012', 'a checkpoint needs a position',
            jsonb_build_object('field', 'position'));
    END IF;
    -- The epoch fences, not the clock: a worker whose page outlasted its lease still owns
    -- the checkpoint if nobody claimed it since (its fence has held the row all along), and
    -- refusing it would roll back every long page forever. A NULL epoch is refused too.
    IF v_row.epoch IS DISTINCT FROM p_epoch THEN
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

-- The first statement of every page a worker applies (and its renewal while idle): lock
-- the checkpoint row, check that this worker still owns it with a live lease and that the
-- checkpoint is where the page starts, and extend the lease. Taking the checkpoint row
-- before touching any projection table gives every writer (workers, rebuild) one lock order.
CREATE OR REPLACE FUNCTION pgstate.fence_projection_v1(p_projection text, p_member integer,
    p_epoch bigint, p_tx xid8, p_pos bigint, p_ttl_ms bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row pgstate.checkpoints%ROWTYPE;
    v_now timestamptz := clock_timestamp();
BEGIN
    PERFORM pgstate.check_lease_ttl(p_ttl_ms);
    SELECT * INTO v_row FROM pgstate.checkpoints c
     WHERE c.projection = p_projection AND c.member = p_member FOR UPDATE;
    -- IS DISTINCT FROM: a NULL epoch or position must be refused, not make the test NULL.
    IF NOT FOUND OR v_row.epoch IS DISTINCT FROM p_epoch OR v_row.lease_expires_at <= v_now
       OR (v_row.tx, v_row.pos) IS DISTINCT FROM (p_tx, p_pos) THEN
        PERFORM pgstate.raise_error('SM005',
            format('projection %s member %s: epoch %s no longer owns the checkpoint at %s:%s',
                   p_projection, p_member, p_epoch, p_tx, p_pos),
            jsonb_build_object('projection', p_projection, 'member', p_member,
                               'lease_owner', v_row.owner, 'lease_epoch', v_row.epoch));
    END IF;
    UPDATE pgstate.checkpoints
       SET lease_expires_at = v_now + make_interval(secs => p_ttl_ms / 1000.0)
     WHERE projection = p_projection AND member = p_member;
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.set_notify_mode_v1(p_mode text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_attempt integer;
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
    -- The lock ALTER TABLE takes, without queueing for it: a waiting ALTER would stop every
    -- append behind it for as long as any transaction that wrote the log stays open.
    FOR v_attempt IN 1..200 LOOP
        BEGIN
            LOCK TABLE pgstate.events IN SHARE ROW EXCLUSIVE MODE NOWAIT;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            IF v_attempt = 200 THEN
                RAISE EXCEPTION 'the log stayed busy for 5 s: notify mode not changed'
                    USING ERRCODE = '55P03';
            END IF;
            PERFORM pg_sleep(0.025);
        END;
    END LOOP;
    IF p_mode = 'commit' THEN
        ALTER TABLE pgstate.events ENABLE TRIGGER events_notify;
    ELSE
        ALTER TABLE pgstate.events DISABLE TRIGGER events_notify;
    END IF;
    UPDATE pgstate.config SET value = p_mode WHERE key = 'notify_mode';
END;
$$;

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

REVOKE ALL ON FUNCTION pgstate.check_lease_ttl(bigint),
    pgstate.claim_projection(text, integer, integer, text, bigint, boolean),
    pgstate.take_over_projection_v1(text, integer, integer, text, bigint)
    FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgstate_writer') THEN
        GRANT EXECUTE ON FUNCTION pgstate.check_lease_ttl(bigint) TO pgstate_writer;
        REVOKE EXECUTE ON FUNCTION
            pgstate.migrate_instances_v1(text, text, integer, integer, jsonb, jsonb, text,
                                         integer),
            pgstate.set_notify_mode_v1(text),
            pgstate.unpark_event_v1(text, xid8, bigint)
            FROM pgstate_writer;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgstate_admin') THEN
        GRANT EXECUTE ON FUNCTION
            pgstate.take_over_projection_v1(text, integer, integer, text, bigint),
            pgstate.migrate_instances_v1(text, text, integer, integer, jsonb, jsonb, text,
                                         integer),
            pgstate.set_notify_mode_v1(text),
            pgstate.unpark_event_v1(text, xid8, bigint)
            TO pgstate_admin;
    END IF;
END;
$$;
