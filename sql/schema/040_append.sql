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

-- append_v2: append a batch to one stream, checking the expected version first.
-- p_expected: -1 any, -2 the stream must exist, 0 no stream yet, n > 0 exactly n.
-- The optional arrays may be empty; unnest pads them with NULLs. A version conflict is
-- raised as an error (p_on_conflict 'raise'), or returned in code, message and detail
-- ('return'): an expected outcome of optimistic concurrency then costs the server no
-- aborted transaction and no logged ERROR, and the caller's transaction goes on.
CREATE FUNCTION pgstate.append_v2(
    p_tenant text, p_stream_id text, p_expected bigint,
    p_event_ids uuid[], p_types text[], p_data text[], p_metadata text[],
    p_schema_versions integer[], p_causation_ids uuid[], p_correlation_ids uuid[],
    p_actor jsonb, p_traceparent text, p_on_conflict text,
    OUT from_version bigint, OUT to_version bigint, OUT tx xid8,
    OUT first_pos bigint, OUT last_pos bigint, OUT duplicate boolean,
    OUT code text, OUT message text, OUT detail jsonb)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
-- Every statement here is a keyed lookup: a young table's few pages must not get a scan
-- plan cached for the session.
SET enable_seqscan = off
SET enable_bitmapscan = off
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
    -- that call the function directly, before anything else (a malformed batch is refused
    -- as such, whatever the stream's version or a stored retry says). Text that starts
    -- with '{' and casts to jsonb (in the insert below) is a JSON object; in a batch the
    -- common text, '{' first, passes without the copy a trim makes. A single event, the
    -- common case, is checked with plain expressions, which cost far less than a query
    -- over the arrays.
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
                      OR NOT (starts_with(u.data COLLATE "C", '{')
                              OR left(ltrim(u.data, E' \t\n\r'), 1) = '{')
                      OR NOT (u.metadata IS NULL OR starts_with(u.metadata COLLATE "C", '{')
                              OR left(ltrim(u.metadata, E' \t\n\r'), 1) = '{')) THEN
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
    IF p_on_conflict IS NULL OR p_on_conflict NOT IN ('raise', 'return') THEN
        PERFORM pgstate.raise_error('SM012', 'on_conflict must be raise or return',
            jsonb_build_object('field', 'on_conflict'));
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
            message := format('stream %s is at version %s, expected %s', p_stream_id,
                              coalesce(v_current, 0),
                              CASE p_expected WHEN -2 THEN 'an existing stream'
                                              WHEN 0 THEN 'no stream'
                                              ELSE p_expected::text END);
            detail := pgstate.head_json(p_tenant, p_stream_id)
                      || jsonb_build_object('expected_version', p_expected);
            IF p_on_conflict = 'return' THEN
                code := 'SM004';
                from_version := NULL;
                to_version := NULL;
                tx := NULL;
                first_pos := NULL;
                last_pos := NULL;
                duplicate := NULL;
                RETURN;
            END IF;
            PERFORM pgstate.raise_error('SM004', message, detail);
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

-- append_v1: append_v2 raising its conflicts, as the first release had it; kept for SQL
-- callers and for application code deployed before append_v2.
CREATE FUNCTION pgstate.append_v1(
    p_tenant text, p_stream_id text, p_expected bigint,
    p_event_ids uuid[], p_types text[], p_data text[], p_metadata text[],
    p_schema_versions integer[], p_causation_ids uuid[], p_correlation_ids uuid[],
    p_actor jsonb, p_traceparent text,
    OUT from_version bigint, OUT to_version bigint, OUT tx xid8,
    OUT first_pos bigint, OUT last_pos bigint, OUT duplicate boolean)
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a.from_version, a.to_version, a.tx, a.first_pos, a.last_pos, a.duplicate
      FROM pgstate.append_v2(
        p_tenant, p_stream_id, p_expected, p_event_ids, p_types, p_data, p_metadata,
        p_schema_versions, p_causation_ids, p_correlation_ids, p_actor, p_traceparent,
        'raise') a;
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

-- The row append_one_v2 returns (a declared type: see transition_outcome).
CREATE TYPE pgstate.append_outcome AS (
    from_version bigint, to_version bigint, tx xid8, first_pos bigint, last_pos bigint,
    duplicate boolean);

-- The row append_one_v3 returns: append_outcome, and for a conflict it was asked to return
-- rather than raise, the refusal (code, message and detail as the error would carry them),
-- as append_v2's last three columns.
CREATE TYPE pgstate.append_one_outcome AS (
    from_version bigint, to_version bigint, tx xid8, first_pos bigint, last_pos bigint,
    duplicate boolean, code text, message text, detail jsonb);

-- append_one_v3: append_v2 for one event, the common call, with scalar arguments (no arrays
-- to build, send and unpack, and no per-array checks). It handles the plain case itself: a
-- well-formed event, a stream that is not a machine instance, the expected version met
-- and, for "any" and "exists", an event id not stored yet. It answers a plain version
-- conflict (an exact version not met, by an event id not stored) with append_v2's refusal:
-- raised as the error (p_on_conflict 'raise'), or returned as a row ('return'), which
-- spares the server an aborted transaction and a logged ERROR for an expected outcome of
-- optimistic concurrency. Everything else (bad input, a retry, a writer-order refusal)
-- goes to append_v2, which answers it exactly as it would have answered the batch of one.
CREATE FUNCTION pgstate.append_one_v3(
    p_tenant text, p_stream_id text, p_expected bigint,
    p_event_id uuid, p_type text, p_data text, p_metadata text,
    p_schema_version integer, p_causation_id uuid, p_correlation_id uuid,
    p_actor jsonb, p_traceparent text, p_on_conflict text)
RETURNS pgstate.append_one_outcome
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
    v_result pgstate.append_one_outcome;
    v_plain boolean;
    v_message text;
    v_detail jsonb;
BEGIN
    IF length(p_tenant) BETWEEN 1 AND 100 AND length(p_stream_id) BETWEEN 1 AND 200
       AND p_expected >= -2 AND p_event_id IS NOT NULL AND length(p_type) BETWEEN 1 AND 200
       AND left(ltrim(p_data, E' \t\n\r'), 1) = '{'
       AND left(ltrim(coalesce(p_metadata, '{}'), E' \t\n\r'), 1) = '{'
       AND p_on_conflict IN ('raise', 'return') THEN
        IF NOT pg_try_advisory_xact_lock(hashtextextended(p_tenant || '/' || p_stream_id, 0))
        THEN
            PERFORM pg_advisory_xact_lock(hashtextextended(p_tenant || '/' || p_stream_id, 0));
        END IF;
        SELECT s.version, s.machine, s.last_tx INTO v_current, v_machine, v_last_tx
          FROM pgstate.streams s
         WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id;
        v_plain := v_machine IS NULL AND coalesce(v_last_tx <= pg_current_xact_id(), true);
        -- The id probe is its own statement, run only for "any" and "exists", so that an
        -- exact version never evaluates it. An expression that the planner can fold to a
        -- constant for some calls (an exact version made the probe's condition false) gets
        -- a custom plan for every call, planned afresh.
        IF v_plain AND coalesce(v_current, 0) <> p_expected THEN
            IF p_expected >= 0 THEN
                v_plain := false;
            ELSE
                v_plain := (p_expected = -1 OR v_current IS NOT NULL)
                           AND NOT EXISTS (SELECT 1 FROM pgstate.events e
                                            WHERE e.event_id = p_event_id);
            END IF;
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
            RETURN (v_current + 1, v_current + 1, v_tx, v_pos, v_pos, false, NULL, NULL, NULL)
                   ::pgstate.append_one_outcome;
        END IF;
        -- A plain conflict, refused exactly as append_v2 refuses it: an exact version the
        -- stream is not at, by an event whose id is not stored (so not a retry). The detail
        -- is the head row as head_json shapes it, then the expected version; head_json's
        -- query is written out here, which costs a third of calling the SQL function.
        IF v_machine IS NULL AND p_expected >= 0 AND coalesce(v_current, 0) <> p_expected
        THEN
            IF NOT EXISTS (SELECT 1 FROM pgstate.events e WHERE e.event_id = p_event_id) THEN
                v_message := format('stream %s is at version %s, expected %s', p_stream_id,
                                    coalesce(v_current, 0),
                                    CASE p_expected WHEN 0 THEN 'no stream'
                                                    ELSE p_expected::text END);
                v_detail := coalesce(
                    (SELECT jsonb_build_object(
                         'tenant', s.tenant, 'stream_id', s.stream_id, 'category', s.category,
                         'version', s.version, 'state', s.state, 'machine', s.machine,
                         'machine_version', s.machine_version, 'lease_owner', s.lease_owner,
                         'lease_epoch', s.lease_epoch, 'lease_expires_at', s.lease_expires_at,
                         'deadline_at', s.deadline_at, 'archived', s.archived,
                         'expected_version', p_expected)
                       FROM pgstate.streams s
                      WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id),
                    jsonb_build_object('tenant', p_tenant, 'stream_id', p_stream_id,
                                       'version', 0, 'expected_version', p_expected));
                IF p_on_conflict = 'return' THEN
                    RETURN (NULL, NULL, NULL, NULL, NULL, NULL, 'SM004', v_message, v_detail)
                           ::pgstate.append_one_outcome;
                END IF;
                PERFORM pgstate.raise_error('SM004', v_message, v_detail);
            END IF;
        END IF;
    END IF;
    -- append_v2 refuses bad input first, then an unknown p_on_conflict, as the batch does.
    SELECT a.from_version, a.to_version, a.tx, a.first_pos, a.last_pos, a.duplicate, a.code,
           a.message, a.detail
      INTO v_result
      FROM pgstate.append_v2(p_tenant, p_stream_id, p_expected, ARRAY[p_event_id],
                             ARRAY[p_type], ARRAY[p_data],
                             CASE WHEN p_metadata IS NOT NULL THEN ARRAY[p_metadata] END,
                             CASE WHEN p_schema_version IS NOT NULL
                                  THEN ARRAY[p_schema_version] END,
                             CASE WHEN p_causation_id IS NOT NULL
                                  THEN ARRAY[p_causation_id] END,
                             CASE WHEN p_correlation_id IS NOT NULL
                                  THEN ARRAY[p_correlation_id] END,
                             p_actor, p_traceparent, p_on_conflict) a;
    RETURN v_result;
END;
$$;

-- append_one_v2: append_one_v3 raising its conflicts, as migration 0005 defined it; kept for
-- SQL callers and for application code deployed before append_one_v3.
CREATE FUNCTION pgstate.append_one_v2(
    p_tenant text, p_stream_id text, p_expected bigint,
    p_event_id uuid, p_type text, p_data text, p_metadata text,
    p_schema_version integer, p_causation_id uuid, p_correlation_id uuid,
    p_actor jsonb, p_traceparent text)
RETURNS pgstate.append_outcome
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT o.from_version, o.to_version, o.tx, o.first_pos, o.last_pos, o.duplicate
      FROM pgstate.append_one_v3(
        p_tenant, p_stream_id, p_expected, p_event_id, p_type, p_data, p_metadata,
        p_schema_version, p_causation_id, p_correlation_id, p_actor, p_traceparent,
        'raise') o;
$$;

-- append_one_v1: append_one_v2 with OUT parameters, as the first release had it; kept for
-- SQL callers and for application code deployed before append_one_v2.
CREATE FUNCTION pgstate.append_one_v1(
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
