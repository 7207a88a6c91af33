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
