-- Statements for state machines. Parameters use psycopg's %(name)s style.

-- name: register_machine
SELECT o_version, o_created
  FROM pgstate.register_machine_v1(%(name)s, %(def_hash)s, %(definition)s::jsonb)

-- name: create_instance
SELECT o_state, o_version, o_machine_version, o_tx, o_pos, o_deadline_at, o_duplicate
  FROM pgstate.create_v1(%(tenant)s, %(stream_id)s, %(machine)s, %(def_hash)s,
                         %(data)s::jsonb, %(actor)s::jsonb, %(event_id)s::uuid,
                         %(causation_id)s::uuid, %(correlation_id)s::uuid, %(traceparent)s)

-- name: transition
SELECT outcome, code, message, from_state, to_state, version, tx, pos, lease_epoch,
       deadline_at, lock_wait_us, detail
  FROM pgstate.transition_v3(%(tenant)s, %(stream_id)s, %(event)s, %(expected_state)s,
                             %(expected_version)s::bigint, %(idempotency_key)s,
                             %(actor)s::jsonb, %(reason)s, %(data)s::jsonb,
                             %(lease_epoch)s::bigint, %(traceparent)s, %(event_id)s::uuid,
                             %(causation_id)s::uuid, %(correlation_id)s::uuid,
                             %(release_lease)s, %(on_rejection)s, %(record_as)s)

-- name: acquire_lease
SELECT o_epoch, o_expires_at, o_version, o_state
  FROM pgstate.acquire_lease_v1(%(tenant)s, %(stream_id)s, %(owner)s, %(ttl_ms)s::bigint)

-- name: renew_lease
SELECT o_epoch, o_expires_at, o_version, o_state
  FROM pgstate.renew_lease_v1(%(tenant)s, %(stream_id)s, %(owner)s, %(epoch)s::bigint,
                              %(ttl_ms)s::bigint)

-- name: release_lease
SELECT pgstate.release_lease_v1(%(tenant)s, %(stream_id)s, %(owner)s, %(epoch)s::bigint)

-- name: fire_due_timeouts
SELECT o_tenant, o_stream_id, o_event, o_from_state, o_to_state, o_version, o_lease_epoch
  FROM pgstate.fire_due_timeouts_v1(%(limit)s::integer)

-- name: migrate_instances
SELECT o_moved, o_last
  FROM pgstate.migrate_instances_v1(%(tenant)s, %(machine)s, %(from_version)s::integer,
                                    %(to_version)s::integer, %(state_map)s::jsonb,
                                    %(actor)s::jsonb, %(after)s::text, %(limit)s::integer)

-- Lowest ids first, so agents of one role contend for the same work in a stable order.
-- name: find_in_state
SELECT stream_id
  FROM pgstate.streams
 WHERE tenant = %(tenant)s AND machine = %(machine)s AND state = %(state)s
 ORDER BY stream_id
 LIMIT %(limit)s

-- name: rejections
SELECT id, event, code, message, detail, actor, reason, idempotency_key, traceparent,
       recorded_at
  FROM pgstate.rejections
 WHERE tenant = %(tenant)s AND stream_id = %(stream_id)s
 ORDER BY id

-- name: count_by_state
SELECT state, count(*)
  FROM pgstate.streams
 WHERE tenant = %(tenant)s AND machine = %(machine)s
 GROUP BY state

-- Every event of a machine's instances, for checking invariants over the whole history.
-- name: machine_history
SELECT e.stream_id, e.version, e.type
  FROM pgstate.events e
  JOIN pgstate.streams s ON s.tenant = e.tenant AND s.stream_id = e.stream_id
 WHERE s.tenant = %(tenant)s AND s.machine = %(machine)s
 ORDER BY e.stream_id, e.version
