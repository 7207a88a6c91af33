-- One head row per stream. A stream governed by a state machine is an aggregate
-- instance; a plain stream leaves the machine columns NULL.
CREATE TABLE pgstate.streams (
    tenant            text        NOT NULL,
    stream_id         text        NOT NULL,
    category          text        NOT NULL,
    version           bigint      NOT NULL,
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
    version         bigint      NOT NULL,
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
