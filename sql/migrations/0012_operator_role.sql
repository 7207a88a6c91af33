-- The operator's calls leave pgstate_writer for a role of their own, pgstate_admin (a
-- member of pgstate_writer). They change what the application's own calls enforce:
-- migrate_instances_v1 moves instances to any state of another version without an edge,
-- set_notify_mode_v1 takes a table lock on the log and changes its trigger,
-- unpark_event_v1 drops a parked event, and a forced projection claim fences a live
-- worker out. The application role keeps everything its writes, reads, leases, workers,
-- sweeper and registrations need.
--
-- The forced claim was a parameter of the workers' own claim; it is now its own function,
-- take_over_projection_v1, over the body both share (claim_projection, internal).

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = current_user
                 AND (rolsuper OR rolcreaterole))
       AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgstate_writer')
       AND NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgstate_admin') THEN
        CREATE ROLE pgstate_admin NOLOGIN IN ROLE pgstate_writer;
    END IF;
END;
$$;

ALTER FUNCTION pgstate.claim_projection_v1(text, integer, integer, text, bigint, boolean)
    RENAME TO claim_projection;

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

REVOKE ALL ON FUNCTION pgstate.claim_projection_v1(text, integer, integer, text, bigint, boolean),
    pgstate.take_over_projection_v1(text, integer, integer, text, bigint)
    FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgstate_writer') THEN
        GRANT EXECUTE ON FUNCTION
            pgstate.claim_projection_v1(text, integer, integer, text, bigint, boolean)
            TO pgstate_writer;
        REVOKE EXECUTE ON FUNCTION
            pgstate.claim_projection(text, integer, integer, text, bigint, boolean),
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
