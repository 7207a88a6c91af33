-- Statements for listeners, projections and snapshots.

-- name: listen
LISTEN pgstate_events

-- name: unlisten
UNLISTEN pgstate_events

-- name: set_notify_mode
SELECT pgstate.set_notify_mode_v1(%(mode)s)

-- Committed events that tailing readers cannot see yet, because an older transaction
-- is still open: how many (up to a cap) and since when.
-- name: held_back
SELECT count(*), min(recorded_at)
  FROM (SELECT recorded_at
          FROM pgstate.events
         WHERE tx >= pg_snapshot_xmin(pg_current_snapshot())
         LIMIT 10000) held

-- The session holding the horizon: the oldest transaction with an id.
-- name: horizon_holder
SELECT pid, state, xact_start, clock_timestamp() - xact_start, left(query, 200)
  FROM pg_stat_activity
 WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
 ORDER BY age(backend_xid) DESC
 LIMIT 1

-- All tenants, one consumer-group member's share of the streams, in commit order.
-- name: read_member
SELECT tx, pos, tenant, stream_id, version, type, data::text, NULLIF(metadata, '{}')::text,
       event_id, schema_version, causation_id, correlation_id, actor::text, traceparent,
       machine_version, recorded_at
  FROM pgstate.events
 WHERE (tx, pos) > (%(tx)s::xid8, %(pos)s::bigint)
   AND tx < pg_snapshot_xmin(pg_current_snapshot())
   AND (%(members)s = 1 OR abs(hashtextextended(stream_id, 0)) %% %(members)s = %(member)s)
 ORDER BY tx, pos
 LIMIT %(limit)s

-- name: read_range
SELECT tx, pos, tenant, stream_id, version, type, data::text, NULLIF(metadata, '{}')::text,
       event_id, schema_version, causation_id, correlation_id, actor::text, traceparent,
       machine_version, recorded_at
  FROM pgstate.events
 WHERE tx = %(tx)s::xid8 AND pos BETWEEN %(first)s AND %(last)s
 ORDER BY pos

-- name: read_one
SELECT tx, pos, tenant, stream_id, version, type, data::text, NULLIF(metadata, '{}')::text,
       event_id, schema_version, causation_id, correlation_id, actor::text, traceparent,
       machine_version, recorded_at
  FROM pgstate.events
 WHERE tx = %(tx)s::xid8 AND pos = %(pos)s

-- name: claim_projection
SELECT o_epoch, o_tx, o_pos
  FROM pgstate.claim_projection_v1(%(projection)s, %(member)s, %(members)s, %(owner)s,
                                   %(ttl_ms)s::bigint, false)

-- name: take_over_projection
SELECT o_epoch, o_tx, o_pos
  FROM pgstate.take_over_projection_v1(%(projection)s, %(member)s, %(members)s, %(owner)s,
                                       %(ttl_ms)s::bigint)

-- name: save_checkpoint
SELECT pgstate.save_checkpoint_v1(%(projection)s, %(member)s, %(epoch)s::bigint,
                                  %(tx)s::xid8, %(pos)s::bigint, %(ttl_ms)s::bigint)

-- name: checkpoints_of
SELECT member, members, tx, pos
  FROM pgstate.checkpoints
 WHERE projection = %(projection)s

-- name: park_event
SELECT pgstate.park_event_v1(%(projection)s, %(member)s, %(epoch)s::bigint, %(tx)s::xid8,
                             %(pos)s::bigint, %(error)s, %(attempts)s)

-- name: parked_events
SELECT tx, pos, stream_id, version, error, attempts, parked_at
  FROM pgstate.parked_events
 WHERE projection = %(projection)s
 ORDER BY tx, pos

-- name: unpark_event
SELECT pgstate.unpark_event_v1(%(projection)s, %(tx)s::xid8, %(pos)s::bigint)

-- name: load_snapshot
SELECT version, state
  FROM pgstate.snapshots
 WHERE tenant = %(tenant)s AND stream_id = %(stream_id)s AND fold_hash = %(fold_hash)s

-- name: save_snapshot
SELECT pgstate.save_snapshot_v1(%(tenant)s, %(stream_id)s, %(fold_hash)s, %(version)s,
                                %(state)s::jsonb)

-- name: clock
SELECT clock_timestamp()

-- name: release_projection
SELECT pgstate.release_projection_v1(%(projection)s, %(member)s, %(epoch)s::bigint)

-- name: member_of_stream
SELECT abs(hashtextextended(%(stream_id)s, 0)) %% %(members)s

-- Identifier templates for rebuilds, filled with psycopg.sql.Identifier.
-- name: drop_table
DROP TABLE IF EXISTS {table}

-- name: rename_table
ALTER TABLE {table} RENAME TO {new_name}

-- name: estimated_events
SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'pgstate.events'::regclass

-- The relay's step in one round trip: the head, and a notification if it moved.
-- name: notify_if_moved
SELECT head.tx, head.pos,
       CASE WHEN (head.tx, head.pos) <> (%(tx)s::xid8, %(pos)s::bigint)
            THEN pg_notify('pgstate_events', head.tx::text || ':' || head.pos::text) END
  FROM (SELECT tx, pos
          FROM pgstate.events
         WHERE tx < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY tx DESC, pos DESC
         LIMIT 1) head

-- name: fence_projection
SELECT pgstate.fence_projection_v1(%(projection)s, %(member)s, %(epoch)s::bigint,
                                   %(tx)s::xid8, %(pos)s::bigint, %(ttl_ms)s::bigint)

-- One rebuild of a projection at a time: a session lock held for the whole rebuild (it
-- writes one shadow table), released when its connection closes.
-- name: may_take_over_projection
SELECT has_function_privilege(
           'pgstate.take_over_projection_v1(text, integer, integer, text, bigint)', 'EXECUTE')

-- name: try_rebuild_lock
SELECT pg_try_advisory_lock(hashtextextended('pgstate-rebuild/' || %(projection)s, 0))
