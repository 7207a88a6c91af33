-- Roles for the host application: readers select, writers also execute the write
-- functions, and pgstate_admin (a writer) also the operator's calls, which change what the
-- writers' calls enforce: migrate_instances_v1, set_notify_mode_v1, unpark_event_v1 and
-- take_over_projection_v1. Nobody but the owner may change the log; writes go through
-- SECURITY DEFINER functions. Roles are cluster-wide, so they are created only when
-- missing and only when the migrating user may create roles.
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
        -- IN ROLE needs ADMIN on pgstate_writer since PostgreSQL 16, which a CREATEROLE
        -- migrator lacks if another role created pgstate_writer.
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgstate_admin') THEN
            BEGIN
                CREATE ROLE pgstate_admin NOLOGIN IN ROLE pgstate_writer;
            EXCEPTION WHEN insufficient_privilege THEN
                RAISE NOTICE 'pgstate_admin not created: %', SQLERRM;
            END;
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
        REVOKE EXECUTE ON FUNCTION
            pgstate.claim_projection(text, integer, integer, text, bigint, boolean),
            pgstate.take_over_projection_v1(text, integer, integer, text, bigint),
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
