-- A batch's events checked in the insert that stores them: append_v1's body, same
-- signature, same refusals.
--
-- A batch of more than one event was checked by a query of its own over the arrays (an id,
-- a type of 1 to 200 characters, data and metadata that start as JSON objects) before the
-- insert unpacked the same arrays again: about 7 % of the server's instructions for a
-- batch of 100. Each event is now checked in the insert, before its data is cast (text
-- that starts with '{' passes without the copy a trim makes; only other text is trimmed),
-- and a malformed one raises the same SM012 from there (refuse_batch_events); the statement
-- aborts, so nothing is stored. One difference in order: the stream lock and the version
-- check now come before a malformed event is found, so a batch that is both malformed and
-- at the wrong version is refused as a version conflict. The duplicate-id check stays in
-- front (a missing id is left to the insert's check, which names it).

-- The refusal of a batch holding a malformed event, raised from inside the insert that
-- checks each event (so it is typed jsonb, the column it stands in for, and never returns).
CREATE FUNCTION pgstate.refuse_batch_events() RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgstate.raise_error('SM012',
        'each event needs an id, a type of 1 to 200 characters and JSON objects as data '
        'and metadata', jsonb_build_object('field', 'events'));
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION pgstate.append_v1(
    p_tenant text, p_stream_id text, p_expected bigint,
    p_event_ids uuid[], p_types text[], p_data text[], p_metadata text[],
    p_schema_versions integer[], p_causation_ids uuid[], p_correlation_ids uuid[],
    p_actor jsonb, p_traceparent text,
    OUT from_version bigint, OUT to_version bigint, OUT tx xid8,
    OUT first_pos bigint, OUT last_pos bigint, OUT duplicate boolean)
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
    -- that call the function directly. Text that starts with '{' and casts to jsonb (in
    -- the insert below) is a JSON object. A single event, the common case, is checked
    -- with plain expressions; a batch's events are checked row by row in the insert itself
    -- (refuse_batch_events), which costs less than a query of its own over the arrays.
    IF v_count = 1 THEN
        IF p_event_ids[1] IS NULL OR p_types[1] IS NULL OR p_data[1] IS NULL
           OR length(p_types[1]) NOT BETWEEN 1 AND 200
           OR left(ltrim(p_data[1], E' \t\n\r'), 1) <> '{'
           OR left(ltrim(coalesce(p_metadata[1], '{}'), E' \t\n\r'), 1) <> '{' THEN
            PERFORM pgstate.raise_error('SM012',
                'each event needs an id, a type of 1 to 200 characters and JSON objects as '
                'data and metadata', jsonb_build_object('field', 'events'));
        END IF;
    -- A missing id is the insert's to refuse, with the message above.
    ELSIF (SELECT count(DISTINCT u.id) FROM unnest(p_event_ids) AS u(id)) <> v_count
          AND array_position(p_event_ids, NULL) IS NULL THEN
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
                   u.type, coalesce(u.schema_version, 1),
                   -- Each event's checks, before its data and metadata are cast.
                   CASE WHEN u.event_id IS NOT NULL AND length(u.type) BETWEEN 1 AND 200
                             AND (starts_with(u.data, '{')
                                  OR left(ltrim(u.data, E' \t\n\r'), 1) = '{')
                             AND (u.metadata IS NULL OR starts_with(u.metadata, '{')
                                  OR left(ltrim(u.metadata, E' \t\n\r'), 1) = '{')
                        THEN u.data::jsonb
                        ELSE pgstate.refuse_batch_events() END,
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
