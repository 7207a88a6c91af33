-- Fast paths: a scalar single-event append and leaner transitions. Same results and
-- errors as before; only the cost per call changes.

-- append_one_v1: append_v1 for one event, the common call, with scalar arguments (no arrays
-- to build, send and unpack, and no per-array checks). It handles the plain case itself: a
-- well-formed event, a stream that is not a machine instance, the expected version met
-- and, for "any" and "exists", an event id not stored yet. Everything else (bad input, a
-- conflict, a retry, a writer-order refusal) goes to append_v1, which answers it exactly
-- as it would have answered the batch of one.
CREATE FUNCTION pgstate.append_one_v1(
    p_tenant text, p_stream_id text, p_expected bigint,
    p_event_id uuid, p_type text, p_data text, p_metadata text,
    p_schema_version integer, p_causation_id uuid, p_correlation_id uuid,
    p_actor jsonb, p_traceparent text,
    OUT from_version bigint, OUT to_version bigint, OUT tx xid8,
    OUT first_pos bigint, OUT last_pos bigint, OUT duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '5s'
AS $$
DECLARE
    v_current bigint;
    v_machine text;
    v_last_tx xid8;
BEGIN
    IF length(p_tenant) BETWEEN 1 AND 100 AND length(p_stream_id) BETWEEN 1 AND 200
       AND p_expected >= -2 AND p_event_id IS NOT NULL AND length(p_type) BETWEEN 1 AND 200
       AND left(ltrim(p_data, E' \t\n\r'), 1) = '{'
       AND left(ltrim(coalesce(p_metadata, '{}'), E' \t\n\r'), 1) = '{' THEN
        PERFORM pg_advisory_xact_lock(hashtextextended(p_tenant || '/' || p_stream_id, 0));
        SELECT s.version, s.machine, s.last_tx INTO v_current, v_machine, v_last_tx
          FROM pgstate.streams s
         WHERE s.tenant = p_tenant AND s.stream_id = p_stream_id;
        IF v_machine IS NULL
           AND (coalesce(v_current, 0) = p_expected
                OR (p_expected = -1 OR (p_expected = -2 AND v_current IS NOT NULL))
                   AND NOT EXISTS (SELECT 1 FROM pgstate.events e
                                    WHERE e.event_id = p_event_id))
           AND coalesce(v_last_tx <= pg_current_xact_id(), true) THEN
            v_current := coalesce(v_current, 0);
            INSERT INTO pgstate.events (tenant, stream_id, version, category, type,
                                        schema_version, data, metadata, event_id,
                                        causation_id, correlation_id, actor, traceparent)
            VALUES (p_tenant, p_stream_id, v_current + 1, split_part(p_stream_id, '-', 1),
                    p_type, coalesce(p_schema_version, 1), p_data::jsonb,
                    coalesce(p_metadata::jsonb, '{}'::jsonb), p_event_id, p_causation_id,
                    p_correlation_id, p_actor, p_traceparent)
            RETURNING pos, events.tx INTO first_pos, tx;
            IF v_current = 0 THEN
                INSERT INTO pgstate.streams (tenant, stream_id, category, version)
                VALUES (p_tenant, p_stream_id, split_part(p_stream_id, '-', 1), 1);
            ELSE
                UPDATE pgstate.streams
                   SET version = v_current + 1, updated_at = clock_timestamp(), last_tx = tx
                 WHERE tenant = p_tenant AND stream_id = p_stream_id;
            END IF;
            from_version := v_current + 1;
            to_version := from_version;
            last_pos := first_pos;
            duplicate := false;
            RETURN;
        END IF;
    END IF;
    SELECT a.from_version, a.to_version, a.tx, a.first_pos, a.last_pos, a.duplicate
      INTO from_version, to_version, tx, first_pos, last_pos, duplicate
      FROM pgstate.append_v1(p_tenant, p_stream_id, p_expected, ARRAY[p_event_id],
                             ARRAY[p_type], ARRAY[p_data],
                             CASE WHEN p_metadata IS NOT NULL THEN ARRAY[p_metadata] END,
                             CASE WHEN p_schema_version IS NOT NULL
                                  THEN ARRAY[p_schema_version] END,
                             CASE WHEN p_causation_id IS NOT NULL
                                  THEN ARRAY[p_causation_id] END,
                             CASE WHEN p_correlation_id IS NOT NULL
                                  THEN ARRAY[p_correlation_id] END,
                             p_actor, p_traceparent) a;
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
