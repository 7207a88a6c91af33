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
