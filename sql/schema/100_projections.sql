-- Notifications are hints ("tx:pos" of the newest event); readers always read the table.
-- Mode 'commit' signals from every writing transaction (a trigger); mode 'relay' keeps
-- NOTIFY off the commit path: a relay process watches the head and signals instead.
CREATE TABLE pgstate.config (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO pgstate.config (key, value) VALUES ('notify_mode', 'relay');

CREATE FUNCTION pgstate.notify_new_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- One notification per transaction: PostgreSQL folds identical payloads.
    PERFORM pg_notify('pgstate_events', pg_current_xact_id()::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify AFTER INSERT ON pgstate.events
    FOR EACH STATEMENT EXECUTE FUNCTION pgstate.notify_new_events();
ALTER TABLE pgstate.events DISABLE TRIGGER events_notify;

CREATE FUNCTION pgstate.set_notify_mode_v1(p_mode text) RETURNS void
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

-- Async projections: one checkpoint per projection and consumer-group member, written in
-- the same transaction as the projection's rows, fenced by a lease epoch.
CREATE TABLE pgstate.checkpoints (
    projection       text        NOT NULL,
    member           integer     NOT NULL DEFAULT 0,
    members          integer     NOT NULL DEFAULT 1,
    tx               xid8        NOT NULL DEFAULT '0',
    pos              bigint      NOT NULL DEFAULT 0,
    owner            text,
    epoch            bigint      NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (projection, member),
    CHECK (member >= 0 AND member < members)
);

-- Events a projection failed on repeatedly: parked with the error, skipped, retryable.
CREATE TABLE pgstate.parked_events (
    projection text        NOT NULL,
    tx         xid8        NOT NULL,
    pos        bigint      NOT NULL,
    stream_id  text        NOT NULL,
    version    bigint      NOT NULL,
    error      text        NOT NULL,
    attempts   integer     NOT NULL,
    parked_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (projection, tx, pos)
);

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

CREATE FUNCTION pgstate.claim_projection_v1(p_projection text, p_member integer,
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
CREATE FUNCTION pgstate.save_checkpoint_v1(p_projection text, p_member integer, p_epoch bigint,
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
CREATE FUNCTION pgstate.fence_projection_v1(p_projection text, p_member integer,
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

-- Snapshots of a folded state, keyed by the fold's definition hash.
CREATE TABLE pgstate.snapshots (
    tenant     text        NOT NULL,
    stream_id  text        NOT NULL,
    fold_hash  text        NOT NULL,
    version    bigint      NOT NULL,
    state      jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant, stream_id, fold_hash)
);

CREATE FUNCTION pgstate.park_event_v1(p_projection text, p_member integer, p_epoch bigint,
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

CREATE FUNCTION pgstate.unpark_event_v1(p_projection text, p_tx xid8, p_pos bigint)
RETURNS boolean
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH removed AS (
        DELETE FROM pgstate.parked_events
         WHERE projection = p_projection AND tx = p_tx AND pos = p_pos
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM removed);
$$;

CREATE FUNCTION pgstate.save_snapshot_v1(p_tenant text, p_stream_id text, p_fold_hash text,
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

CREATE FUNCTION pgstate.release_projection_v1(p_projection text, p_member integer,
    p_epoch bigint) RETURNS boolean
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH released AS (
        UPDATE pgstate.checkpoints SET owner = NULL, lease_expires_at = NULL
         WHERE projection = p_projection AND member = p_member AND epoch = p_epoch
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM released);
$$;
