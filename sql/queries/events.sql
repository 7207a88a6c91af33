-- Statements the Python package runs. Each block starts with "-- name: <name>";
-- parameters use psycopg's %(name)s style.

-- Arrays go in binary (%(x)b): the text form quotes and escapes every element, which
-- costs a hundred-event batch more than the append itself. on_conflict 'return' answers a
-- version conflict as a row (code, message, detail), which the client raises: no aborted
-- transaction, no logged ERROR; 'raise' makes it an ERROR that aborts the transaction (a
-- multi-stream append must not commit the streams appended before the conflict).
-- name: append
SELECT from_version, to_version, tx, first_pos, last_pos, duplicate, code, message, detail
  FROM pgstate.append_v2(%(tenant)s, %(stream_id)s, %(expected)s, %(event_ids)b::uuid[],
                         %(types)b::text[], %(data)b::text[], %(metadata)b::text[],
                         %(schema_versions)b::integer[], %(causation_ids)b::uuid[],
                         %(correlation_ids)b::uuid[], %(actor)s::jsonb, %(traceparent)s,
                         %(on_conflict)s)

-- The single-event call, the common one; on_conflict as above.
-- name: append_one
SELECT from_version, to_version, tx, first_pos, last_pos, duplicate, code, message, detail
  FROM pgstate.append_one_v3(%(tenant)s, %(stream_id)s, %(expected)s, %(event_id)s::uuid,
                             %(type)s, %(data)s, %(metadata)s, %(schema_version)s::integer,
                             %(causation_id)s::uuid, %(correlation_id)s::uuid,
                             %(actor)s::jsonb, %(traceparent)s, %(on_conflict)s)

-- name: check_version
SELECT pgstate.check_version_v1(%(tenant)s, %(stream_id)s, %(expected)s)

-- name: read_stream_forward
SELECT tx, pos, tenant, stream_id, version, type, data::text, NULLIF(metadata, '{}')::text,
       event_id, schema_version, causation_id, correlation_id, actor::text, traceparent,
       machine_version, recorded_at
  FROM pgstate.events
 WHERE tenant = %(tenant)s AND stream_id = %(stream_id)s AND version >= %(from_version)s
 ORDER BY version
 LIMIT %(limit)s

-- name: read_stream_backward
SELECT tx, pos, tenant, stream_id, version, type, data::text, NULLIF(metadata, '{}')::text,
       event_id, schema_version, causation_id, correlation_id, actor::text, traceparent,
       machine_version, recorded_at
  FROM pgstate.events
 WHERE tenant = %(tenant)s AND stream_id = %(stream_id)s AND version <= %(from_version)s
 ORDER BY version DESC
 LIMIT %(limit)s

-- A reader's cursor is sound when an event is stored at it, or when no event is stored at
-- or before it (a cursor before the log's start). Any other cursor names an event the log
-- does not hold: one a crash took back after an asynchronous commit, or a position from
-- another database. Events stored later below such a cursor would never be read after it.
-- name: cursor_in_log
SELECT EXISTS (SELECT 1 FROM pgstate.events WHERE tx = %(tx)s::xid8 AND pos = %(pos)s::bigint)
       OR NOT EXISTS (SELECT 1 FROM pgstate.events
                       WHERE (tx, pos) < (%(tx)s::xid8, %(pos)s::bigint))

-- Tailing in commit order: only transactions below the snapshot's xmin are certainly
-- finished, so nothing can later appear below the cursor. One statement, one snapshot.
-- name: read_all
SELECT * FROM pgstate.read_all_v1(%(tenant)s, %(tx)s::xid8, %(pos)s::bigint, %(limit)s::integer,
                                   NULL)


-- A filtered read also returns the newest event stored below its statement's horizon (the
-- oldest transaction still running, below which the read saw every row), whatever its type,
-- category or tenant, in one row with no event when nothing matched: a page short of the
-- limit lets the cursor move up to that event, so the next read does not scan again the
-- events the filter skipped. Not up to the horizon itself: transaction ids between the
-- newest stored event and the horizon may have ended without a durable record (a rollback,
-- a refused append), and after a crash the server hands them out again to new events.
-- name: read_all_types
SELECT r.*, w.tx, w.pos
  FROM (SELECT 1) one
  LEFT JOIN LATERAL (SELECT e.tx, e.pos FROM pgstate.events e
                      WHERE e.tx < pg_snapshot_xmin(pg_current_snapshot())
                      ORDER BY e.tx DESC, e.pos DESC LIMIT 1) w ON true
  LEFT JOIN LATERAL pgstate.read_all_v1(%(tenant)s, %(tx)s::xid8, %(pos)s::bigint,
                                        %(limit)s::integer, %(types)s::text[]) r ON true
 ORDER BY r.tx, r.pos


-- name: read_category
SELECT * FROM pgstate.read_category_v1(%(tenant)s, %(category)s, %(tx)s::xid8, %(pos)s::bigint,
                                        %(limit)s::integer, NULL)


-- name: read_category_types
SELECT r.*, w.tx, w.pos
  FROM (SELECT 1) one
  LEFT JOIN LATERAL (SELECT e.tx, e.pos FROM pgstate.events e
                      WHERE e.tx < pg_snapshot_xmin(pg_current_snapshot())
                      ORDER BY e.tx DESC, e.pos DESC LIMIT 1) w ON true
  LEFT JOIN LATERAL pgstate.read_category_v1(%(tenant)s, %(category)s, %(tx)s::xid8,
                                             %(pos)s::bigint, %(limit)s::integer,
                                             %(types)s::text[]) r ON true
 ORDER BY r.tx, r.pos


-- name: stream_state
SELECT tenant, stream_id, category, version, state, machine, machine_version, lease_owner,
       lease_epoch, lease_expires_at, deadline_at, archived, created_at, updated_at
  FROM pgstate.streams
 WHERE tenant = %(tenant)s AND stream_id = %(stream_id)s

-- The position below which every transaction has finished: a reader's safe upper bound.
-- name: watermark
SELECT pg_snapshot_xmin(pg_current_snapshot())

-- Serializes concurrent migrations of one database; the key is a fixed 64-bit hash.
-- name: migration_lock
SELECT pg_advisory_xact_lock(hashtextextended('pgstate/migrate', 0))

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS pgstate

-- name: record_installed_revision
-- The end of the DBA script: the revision it installed, in the version table Alembic keeps,
-- so that `pgstate check` sees the install and `pgstate migrate` goes on from there.
CREATE TABLE IF NOT EXISTS pgstate.alembic_version (
    version_num varchar(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
DELETE FROM pgstate.alembic_version;
INSERT INTO pgstate.alembic_version (version_num) VALUES ({revision});

-- name: create_database_from_template
SELECT format('CREATE DATABASE %%I TEMPLATE %%I', %(name)s::text, %(template)s::text)

-- name: drop_database
SELECT format('DROP DATABASE IF EXISTS %%I WITH (FORCE)', %(name)s::text)

-- Take several stream locks in the given order (callers sort the ids).
-- name: lock_streams
SELECT pgstate.lock_streams_v1(%(tenant)s, %(stream_ids)s::text[])

-- A write with inline projections inside the caller's transaction runs under a savepoint:
-- if a projection fails, the events it was projecting leave the transaction with it.
-- name: savepoint_projected
SAVEPOINT pgstate_projected

-- name: release_projected
RELEASE SAVEPOINT pgstate_projected

-- name: rollback_to_projected
ROLLBACK TO SAVEPOINT pgstate_projected
