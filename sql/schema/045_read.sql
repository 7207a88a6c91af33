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
