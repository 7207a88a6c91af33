-- pgstate lives in one fixed schema so it never collides with the host application.
CREATE SCHEMA IF NOT EXISTS pgstate;
-- One head row per stream. A stream governed by a state machine is an aggregate
-- instance; a plain stream leaves the machine columns NULL.
CREATE TABLE pgstate.streams (
    tenant            text        NOT NULL,
    stream_id         text        NOT NULL,
    category          text        NOT NULL,
    version           bigint      NOT NULL CHECK (version >= 0),
    state             text,
    machine           text,
    machine_version   integer,
    lease_owner       text,
    lease_epoch       bigint      NOT NULL DEFAULT 0,
    lease_expires_at  timestamptz,
    deadline_at       timestamptz,
    archived          boolean     NOT NULL DEFAULT false,
    -- The transaction that wrote the stream last. A writer whose transaction id is older
    -- would sort its events before the ones already stored, so it is refused (40001).
    last_tx           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant, stream_id)
);

-- The append-only log. (tx, pos) is the global position: readers tail it below the
-- xid8 watermark, so a transaction that took a low pos and committed late is never skipped.
CREATE TABLE pgstate.events (
    pos             bigint      GENERATED ALWAYS AS IDENTITY,
    tx              xid8        NOT NULL DEFAULT pg_current_xact_id(),
    tenant          text        NOT NULL,
    stream_id       text        NOT NULL,
    version         bigint      NOT NULL CHECK (version >= 1),
    category        text        NOT NULL,
    type            text        NOT NULL,
    schema_version  integer     NOT NULL DEFAULT 1,
    data            jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    event_id        uuid        NOT NULL,
    causation_id    uuid,
    correlation_id  uuid,
    actor           jsonb,
    traceparent     text,
    machine_version integer,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT events_pkey PRIMARY KEY (tx, pos),
    CONSTRAINT events_stream_version_key UNIQUE (tenant, stream_id, version),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

-- category leads: with tenant first, a fresh table's planner picks this index (and a sort)
-- for read_all too, where only (tx, pos) order serves.
CREATE INDEX events_category_idx ON pgstate.events (category, tenant, tx, pos);

-- The log is immutable: no UPDATE, DELETE or TRUNCATE, whoever the writer is.
CREATE FUNCTION pgstate.reject_event_mutation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgstate.events is append-only: % rejected', TG_OP
        USING ERRCODE = 'SM012';
END;
$$;

CREATE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON pgstate.events
    FOR EACH ROW EXECUTE FUNCTION pgstate.reject_event_mutation();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON pgstate.events
    FOR EACH STATEMENT EXECUTE FUNCTION pgstate.reject_event_mutation();
-- The JSON that every rejection carries as DETAIL: the stream's current head row.
CREATE FUNCTION pgstate.head_json(p_tenant text, p_stream_id text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT jsonb_build_object(
            'tenant', s.tenant, 'stream_id', s.stream_id, 'category', s.category,
            'version', s.version, 'state', s.state, 'machine', s.machine,
            'machine_version', s.machine_version, 'lease_owner', s.lease_owner,
            'lease_epoch', s.lease_epoch, 'lease_expires_at', s.lease_expires_at,
            'deadline_at', s.deadline_at, 'archived', s.archived)
         FROM pgstate.streams s
         WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id),
        jsonb_build_object('tenant', p_tenant, 'stream_id', p_stream_id, 'version', 0));
$$;

-- Raise a typed pgstate error (SQLSTATE class SM) whose DETAIL is JSON.
CREATE FUNCTION pgstate.raise_error(p_code text, p_message text, p_detail jsonb)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = p_code, MESSAGE = p_message,
        DETAIL = coalesce(p_detail, '{}'::jsonb)::text;
END;
$$;

-- Input checks shared by every write function.
CREATE FUNCTION pgstate.check_stream_id(p_tenant text, p_stream_id text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_tenant IS NULL OR length(p_tenant) NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'tenant must be 1 to 100 characters' USING ERRCODE = 'SM012',
            DETAIL = jsonb_build_object('field', 'tenant')::text;
    END IF;
    IF p_stream_id IS NULL OR length(p_stream_id) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'stream id must be 1 to 200 characters' USING ERRCODE = 'SM012',
            DETAIL = jsonb_build_object('field', 'stream_id')::text;
    END IF;
END;
$$;

-- Tailing readers order events by (tx, pos). A transaction whose id was assigned before
-- the stream's last writer committed (it wrote elsewhere before taking the stream lock)
-- would place its events before that writer's: refuse it as a serialization failure, which
-- clients retry in a new transaction (whose id will be newer).
CREATE FUNCTION pgstate.check_writer_order(p_tenant text, p_stream_id text, p_last_tx xid8)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_last_tx > pg_current_xact_id() THEN
        RAISE EXCEPTION USING ERRCODE = '40001',
            MESSAGE = format('stream %s was written by a newer transaction; retry', p_stream_id),
            DETAIL = pgstate.head_json(p_tenant, p_stream_id)::text;
    END IF;
END;
$$;
-- Stream lock: transaction-scoped (safe behind transaction-mode poolers) and keyed by a
-- 64-bit hash, since a 32-bit key collides between unrelated streams far too often.
CREATE FUNCTION pgstate.lock_stream(p_tenant text, p_stream_id text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtextextended(p_tenant || '/' || p_stream_id, 0));
$$;

-- A retry of an append whose events are already stored: return the original result when
-- the stored events are the same ones (ids, stream, order, type, data), otherwise raise.
CREATE FUNCTION pgstate.replay_append(
    p_tenant text, p_stream_id text, p_expected bigint,
    p_event_ids uuid[], p_types text[], p_data text[],
    OUT from_version bigint, OUT to_version bigint, OUT tx xid8,
    OUT first_pos bigint, OUT last_pos bigint, OUT duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_found   integer;
    v_matches integer;
BEGIN
    -- A retry repeats the whole batch, so its first id decides; one index probe instead of
    -- one per event on every append that is not a retry.
    IF NOT EXISTS (SELECT 1 FROM pgstate.events e WHERE e.event_id = p_event_ids[1]) THEN
        duplicate := NULL;  -- not a retry
        RETURN;
    END IF;
    SELECT count(*),
           count(*) FILTER (WHERE e.tenant = p_tenant AND e.stream_id = p_stream_id
                              AND e.type = u.type AND e.data = u.data::jsonb),
           min(e.version), max(e.version), min(e.tx), min(e.pos), max(e.pos)
      INTO v_found, v_matches, from_version, to_version, tx, first_pos, last_pos
      FROM unnest(p_event_ids, p_types, p_data) AS u(id, type, data)
      JOIN pgstate.events e ON e.event_id = u.id;
    IF v_found = 0 THEN
        duplicate := NULL;  -- not a retry
        RETURN;
    END IF;
    IF v_found <> cardinality(p_event_ids) OR v_matches <> v_found
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

-- append_v1: append a batch to one stream, checking the expected version first.
-- p_expected: -1 any, -2 the stream must exist, 0 no stream yet, n > 0 exactly n.
-- The optional arrays may be empty; unnest pads them with NULLs.
CREATE FUNCTION pgstate.append_v1(
    p_tenant text, p_stream_id text, p_expected bigint,
    p_event_ids uuid[], p_types text[], p_data text[], p_metadata text[],
    p_schema_versions integer[], p_causation_ids uuid[], p_correlation_ids uuid[],
    p_actor jsonb, p_traceparent text,
    OUT from_version bigint, OUT to_version bigint, OUT tx xid8,
    OUT first_pos bigint, OUT last_pos bigint, OUT duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    v_count   integer := coalesce(cardinality(p_event_ids), 0);
    v_current bigint;
    v_machine text;
    v_last_tx xid8;
BEGIN
    IF p_tenant IS NULL OR length(p_tenant) NOT BETWEEN 1 AND 100
       OR p_stream_id IS NULL OR length(p_stream_id) NOT BETWEEN 1 AND 200 THEN
        PERFORM pgstate.check_stream_id(p_tenant, p_stream_id);  -- raises the precise error
    END IF;
    IF v_count = 0 OR v_count > 10000 THEN
        PERFORM pgstate.raise_error('SM012', 'a batch holds 1 to 10000 events',
            jsonb_build_object('field', 'events', 'count', v_count));
    END IF;
    IF coalesce(cardinality(p_types), 0) <> v_count
       OR coalesce(cardinality(p_data), 0) <> v_count
       OR coalesce(cardinality(p_metadata), 0) NOT IN (0, v_count)
       OR coalesce(cardinality(p_schema_versions), 0) NOT IN (0, v_count)
       OR coalesce(cardinality(p_causation_ids), 0) NOT IN (0, v_count)
       OR coalesce(cardinality(p_correlation_ids), 0) NOT IN (0, v_count) THEN
        PERFORM pgstate.raise_error('SM012', 'event arrays differ in length',
            jsonb_build_object('field', 'events'));
    END IF;
    -- The Python client checks the events before sending; checked again here for writers
    -- that call the function directly. Text that starts with '{' and casts to jsonb (in
    -- the insert below) is a JSON object. A single event, the common case, is checked
    -- with plain expressions, which cost far less than a query over the arrays.
    IF v_count = 1 THEN
        IF p_event_ids[1] IS NULL OR p_types[1] IS NULL OR p_data[1] IS NULL
           OR length(p_types[1]) NOT BETWEEN 1 AND 200
           OR left(ltrim(p_data[1], E' \t\n\r'), 1) <> '{'
           OR left(ltrim(coalesce(p_metadata[1], '{}'), E' \t\n\r'), 1) <> '{' THEN
            PERFORM pgstate.raise_error('SM012',
                'each event needs an id, a type of 1 to 200 characters and JSON objects as '
                'data and metadata', jsonb_build_object('field', 'events'));
        END IF;
    ELSIF EXISTS (SELECT 1
                    FROM unnest(p_event_ids, p_types, p_data, p_metadata)
                         AS u(event_id, type, data, metadata)
                   WHERE u.event_id IS NULL OR u.type IS NULL OR u.data IS NULL
                      OR length(u.type) NOT BETWEEN 1 AND 200
                      OR left(ltrim(u.data, E' \t\n\r'), 1) <> '{'
                      OR left(ltrim(coalesce(u.metadata, '{}'), E' \t\n\r'), 1) <> '{') THEN
        PERFORM pgstate.raise_error('SM012',
            'each event needs an id, a type of 1 to 200 characters and JSON objects as data '
            'and metadata', jsonb_build_object('field', 'events'));
    ELSIF (SELECT count(DISTINCT u.id) FROM unnest(p_event_ids) AS u(id)) <> v_count THEN
        PERFORM pgstate.raise_error('SM012', 'an event id appears twice in the batch',
            jsonb_build_object('field', 'events'));
    END IF;
    IF p_expected IS NULL OR p_expected < -2 THEN
        PERFORM pgstate.raise_error('SM012', 'unknown expected version',
            jsonb_build_object('field', 'expected_version', 'value', p_expected));
    END IF;

    -- The stream lock (as pgstate.lock_stream), inline on this hot path.
    PERFORM pg_advisory_xact_lock(hashtextextended(p_tenant || '/' || p_stream_id, 0));
    SELECT s.version, s.machine, s.last_tx INTO v_current, v_machine, v_last_tx
      FROM pgstate.streams s
     WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id;
    -- A machine instance changes only through its transitions: a plain append would move
    -- its version without its state, behind the machine's back.
    IF v_machine IS NOT NULL THEN
        PERFORM pgstate.raise_error('SM012',
            format('stream %s is an instance of machine %s: change it with a transition',
                   p_stream_id, v_machine),
            pgstate.head_json(p_tenant, p_stream_id) || jsonb_build_object('field', 'stream_id'));
    END IF;

    -- The version is checked before the insert takes any sequence value, so conflicts
    -- burn no positions. A mismatch may be a retry of an append that already landed.
    IF p_expected < 0 OR coalesce(v_current, 0) <> p_expected THEN
        SELECT r.from_version, r.to_version, r.tx, r.first_pos, r.last_pos, r.duplicate
          INTO from_version, to_version, tx, first_pos, last_pos, duplicate
          FROM pgstate.replay_append(p_tenant, p_stream_id, p_expected,
                                     p_event_ids, p_types, p_data) r;
        IF duplicate THEN
            RETURN;
        END IF;
        IF (p_expected = -2 AND v_current IS NULL)
           OR (p_expected >= 0 AND coalesce(v_current, 0) <> p_expected) THEN
            PERFORM pgstate.raise_error('SM004',
                format('stream %s is at version %s, expected %s', p_stream_id,
                       coalesce(v_current, 0),
                       CASE p_expected WHEN -2 THEN 'an existing stream'
                                       WHEN 0 THEN 'no stream'
                                       ELSE p_expected::text END),
                pgstate.head_json(p_tenant, p_stream_id)
                    || jsonb_build_object('expected_version', p_expected));
        END IF;
    END IF;

    IF v_last_tx > pg_current_xact_id() THEN
        PERFORM pgstate.check_writer_order(p_tenant, p_stream_id, v_last_tx);
    END IF;
    v_current := coalesce(v_current, 0);
    IF v_count = 1 THEN
        INSERT INTO pgstate.events (tenant, stream_id, version, category, type,
                                    schema_version, data, metadata, event_id,
                                    causation_id, correlation_id, actor, traceparent)
        VALUES (p_tenant, p_stream_id, v_current + 1, split_part(p_stream_id, '-', 1),
                p_types[1], coalesce(p_schema_versions[1], 1), p_data[1]::jsonb,
                coalesce(p_metadata[1]::jsonb, '{}'::jsonb), p_event_ids[1],
                p_causation_ids[1], p_correlation_ids[1], p_actor, p_traceparent)
        RETURNING pos INTO first_pos;
        last_pos := first_pos;
    ELSE
        WITH inserted AS (
            INSERT INTO pgstate.events (tenant, stream_id, version, category, type,
                                        schema_version, data, metadata, event_id,
                                        causation_id, correlation_id, actor, traceparent)
            SELECT p_tenant, p_stream_id, v_current + u.ord, split_part(p_stream_id, '-', 1),
                   u.type, coalesce(u.schema_version, 1), u.data::jsonb,
                   coalesce(u.metadata::jsonb, '{}'::jsonb), u.event_id, u.causation_id,
                   u.correlation_id, p_actor, p_traceparent
              FROM unnest(p_event_ids, p_types, p_data, p_metadata, p_schema_versions,
                          p_causation_ids, p_correlation_ids)
                   WITH ORDINALITY AS u(event_id, type, data, metadata, schema_version,
                                        causation_id, correlation_id, ord)
            RETURNING pos
        )
        SELECT min(i.pos), max(i.pos) INTO first_pos, last_pos FROM inserted i;
    END IF;

    IF v_current = 0 THEN
        INSERT INTO pgstate.streams (tenant, stream_id, category, version)
        VALUES (p_tenant, p_stream_id, split_part(p_stream_id, '-', 1), v_count);
    ELSE
        UPDATE pgstate.streams
           SET version = v_current + v_count, updated_at = clock_timestamp(),
               last_tx = pg_current_xact_id()
         WHERE tenant = p_tenant AND stream_id = p_stream_id;
    END IF;

    from_version := v_current + 1;
    to_version := v_current + v_count;
    tx := pg_current_xact_id();
    duplicate := false;
END;
$$;

-- Stream locks for a multi-stream write, taken in the order given, before its first write.
CREATE FUNCTION pgstate.lock_streams_v1(p_tenant text, p_stream_ids text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    v_stream text;
BEGIN
    FOREACH v_stream IN ARRAY coalesce(p_stream_ids, '{}') LOOP
        PERFORM pgstate.check_stream_id(p_tenant, v_stream);
        PERFORM pg_advisory_xact_lock(hashtextextended(p_tenant || '/' || v_stream, 0));
    END LOOP;
END;
$$;

-- A condition on a stream that a multi-stream write reads but does not write: takes the
-- stream lock until commit, so the checked version cannot move before the writes land.
CREATE FUNCTION pgstate.check_version_v1(p_tenant text, p_stream_id text, p_expected bigint)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    v_current bigint;
BEGIN
    PERFORM pgstate.check_stream_id(p_tenant, p_stream_id);
    IF p_expected IS NULL OR p_expected < -2 THEN
        PERFORM pgstate.raise_error('SM012', 'unknown expected version',
            jsonb_build_object('field', 'expected_version', 'value', p_expected));
    END IF;
    PERFORM pgstate.lock_stream(p_tenant, p_stream_id);
    SELECT s.version INTO v_current
      FROM pgstate.streams s
     WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id;
    IF (p_expected = -2 AND v_current IS NULL)
       OR (p_expected >= 0 AND coalesce(v_current, 0) <> p_expected) THEN
        PERFORM pgstate.raise_error('SM004',
            format('stream %s is at version %s, expected %s', p_stream_id,
                   coalesce(v_current, 0), p_expected),
            pgstate.head_json(p_tenant, p_stream_id)
                || jsonb_build_object('expected_version', p_expected));
    END IF;
    RETURN coalesce(v_current, 0);
END;
$$;
-- Tailing reads as functions, for one reason: their planner settings. On a table that has
-- never been analyzed the planner underestimates the rows behind a cursor and picks a
-- bitmap scan plus a sort of everything after it, which makes paging quadratic. Here the
-- only plan left is the (tx, pos) index in order, which is right at every size.
-- Both read in one statement (one snapshot): rows below the watermark, after the cursor.
CREATE FUNCTION pgstate.read_all_v1(p_tenant text, p_tx xid8, p_pos bigint,
    p_limit integer, p_types text[])
RETURNS TABLE (tx xid8, pos bigint, tenant text, stream_id text, version bigint, type text,
               data text, metadata text, event_id uuid, schema_version integer,
               causation_id uuid, correlation_id uuid, actor text, traceparent text,
               machine_version integer, recorded_at timestamptz)
LANGUAGE sql STABLE
SET enable_sort = off
SET enable_bitmapscan = off
AS $$
    SELECT e.tx, e.pos, e.tenant, e.stream_id, e.version, e.type, e.data::text,
           NULLIF(e.metadata, '{}')::text, e.event_id, e.schema_version, e.causation_id,
           e.correlation_id, e.actor::text, e.traceparent, e.machine_version, e.recorded_at
      FROM pgstate.events e
     WHERE (e.tx, e.pos) > (p_tx, p_pos)
       AND e.tx < pg_snapshot_xmin(pg_current_snapshot())
       AND e.tenant = p_tenant
       AND (p_types IS NULL OR e.type = ANY (p_types))
     ORDER BY e.tx, e.pos
     LIMIT p_limit;
$$;

CREATE FUNCTION pgstate.read_category_v1(p_tenant text, p_category text, p_tx xid8,
    p_pos bigint, p_limit integer, p_types text[])
RETURNS TABLE (tx xid8, pos bigint, tenant text, stream_id text, version bigint, type text,
               data text, metadata text, event_id uuid, schema_version integer,
               causation_id uuid, correlation_id uuid, actor text, traceparent text,
               machine_version integer, recorded_at timestamptz)
LANGUAGE sql STABLE
SET enable_sort = off
SET enable_bitmapscan = off
AS $$
    SELECT e.tx, e.pos, e.tenant, e.stream_id, e.version, e.type, e.data::text,
           NULLIF(e.metadata, '{}')::text, e.event_id, e.schema_version, e.causation_id,
           e.correlation_id, e.actor::text, e.traceparent, e.machine_version, e.recorded_at
      FROM pgstate.events e
     WHERE e.category = p_category AND e.tenant = p_tenant
       AND (e.tx, e.pos) > (p_tx, p_pos)
       AND e.tx < pg_snapshot_xmin(pg_current_snapshot())
       AND (p_types IS NULL OR e.type = ANY (p_types))
     ORDER BY e.tx, e.pos
     LIMIT p_limit;
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
