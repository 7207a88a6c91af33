-- State machines as data. Versions are immutable: a changed definition is a new version,
-- and every instance pins the version it was created under.
CREATE TABLE pgstate.machines (
    name          text        NOT NULL,
    version       integer     NOT NULL CHECK (version >= 1),
    def_hash      text        NOT NULL,
    definition    jsonb       NOT NULL,
    initial_state text        NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (name, version)
);

CREATE TABLE pgstate.machine_states (
    name        text    NOT NULL,
    version     integer NOT NULL,
    state       text    NOT NULL,
    final       boolean NOT NULL,
    timeout     interval,
    on_timeout  text,
    PRIMARY KEY (name, version, state),
    FOREIGN KEY (name, version) REFERENCES pgstate.machines (name, version)
);

CREATE TABLE pgstate.machine_edges (
    name           text    NOT NULL,
    version        integer NOT NULL,
    from_state     text    NOT NULL,
    event          text    NOT NULL,
    to_state       text    NOT NULL,
    requires_lease boolean NOT NULL DEFAULT false,
    guard          jsonb,
    -- The target state's timeout, copied here so that a transition finds its edge and the
    -- deadline it sets in one lookup.
    to_timeout     interval,
    PRIMARY KEY (name, version, from_state, event),
    FOREIGN KEY (name, version, from_state) REFERENCES pgstate.machine_states (name, version, state),
    FOREIGN KEY (name, version, to_state) REFERENCES pgstate.machine_states (name, version, state)
);

-- Idempotency keys are scoped to a stream: the stream lock serializes their checks.
CREATE TABLE pgstate.idempotency_keys (
    tenant       text        NOT NULL,
    stream_id    text        NOT NULL,
    key          text        NOT NULL,
    request_hash text        NOT NULL,
    result       jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant, stream_id, key)
);

-- Rejected attempts recorded by try_transition, for audit.
CREATE TABLE pgstate.rejections (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant          text        NOT NULL,
    stream_id       text        NOT NULL,
    event           text        NOT NULL,
    code            text        NOT NULL,
    message         text        NOT NULL,
    detail          jsonb       NOT NULL,
    actor           jsonb,
    reason          text,
    idempotency_key text,
    traceparent     text,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX rejections_stream_idx ON pgstate.rejections (tenant, stream_id, id);

-- Work finders: instances by state, and due deadlines for the sweeper.
CREATE INDEX streams_machine_state_idx ON pgstate.streams (tenant, machine, state, stream_id)
    WHERE machine IS NOT NULL;
CREATE INDEX streams_deadline_idx ON pgstate.streams (deadline_at)
    WHERE deadline_at IS NOT NULL;
