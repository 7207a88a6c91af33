"""Sans-IO operations for state machines (see ``_ops`` for the pattern)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Generator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pgstate._ops import (
    MAX_TRACEPARENT,
    Row,
    Statement,
    check_count,
    check_identifier,
    check_limit,
    encode_actor,
    json_object_param,
    optional_text,
    read_stream,
)
from pgstate._sql import query
from pgstate.errors import InvalidInput, Rejected, returned_refusal
from pgstate.models import (
    FiredTimeout,
    History,
    Instance,
    Lease,
    MachineRegistration,
    Position,
    RejectionRecord,
    TransitionResult,
    uuid7,
)

if TYPE_CHECKING:
    from pgstate.machine import Machine


def _machine_name(machine: object) -> tuple[str, str | None]:
    """Name and definition hash of a Machine class, or a bare name (newest version)."""
    if isinstance(machine, str):
        return check_identifier(machine, "machine", 100), None
    from pgstate.machine import Machine

    if isinstance(machine, type) and issubclass(machine, Machine):
        return str(machine.definition()["name"]), machine.def_hash()
    raise InvalidInput("machine must be a Machine subclass or a name", detail={"field": "machine"})


def _flag(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{field} must be True or False", detail={"field": field})
    return value


def _uuid(value: object, field: str) -> uuid.UUID | None:
    if value is None or isinstance(value, uuid.UUID):
        return value
    raise InvalidInput(f"{field} must be a UUID", detail={"field": field})


def _ttl_ms(ttl: object) -> int:
    if not isinstance(ttl, timedelta) or ttl <= timedelta(0):
        raise InvalidInput("ttl must be a positive timedelta", detail={"field": "ttl"})
    return max(1, int(ttl / timedelta(milliseconds=1)))


def register(machine: type[Machine]) -> Generator[Statement, list[Row], MachineRegistration]:
    from pgstate.machine import Machine

    if not (isinstance(machine, type) and issubclass(machine, Machine)):
        raise InvalidInput("register takes a Machine subclass", detail={"field": "machine"})
    name, def_hash = str(machine.definition()["name"]), machine.def_hash()
    rows = yield Statement(
        query("register_machine"),
        {"name": name, "def_hash": def_hash, "definition": machine.canonical_json()},
    )
    version, created = rows[0]
    return MachineRegistration(name, version, def_hash, created)


def create(
    tenant: str,
    stream_id: str,
    machine: object,
    data: Mapping[str, Any] | None,
    actor: Mapping[str, Any] | None,
    event_id: uuid.UUID | None,
    causation_id: uuid.UUID | None,
    correlation_id: uuid.UUID | None,
    traceparent: str | None,
    *,
    max_data_bytes: int,
) -> Generator[Statement, list[Row], Instance]:
    check_identifier(stream_id, "stream_id")
    name, def_hash = _machine_name(machine)
    rows = yield Statement(
        query("create_instance"),
        {
            "tenant": tenant,
            "stream_id": stream_id,
            "machine": name,
            "def_hash": def_hash,
            "data": json_object_param(data, "data", max_data_bytes),
            "actor": encode_actor(actor),
            "event_id": _uuid(event_id, "event_id"),
            "causation_id": _uuid(causation_id, "causation_id"),
            "correlation_id": _uuid(correlation_id, "correlation_id"),
            "traceparent": optional_text(traceparent, "traceparent", MAX_TRACEPARENT),
        },
    )
    state, version, machine_version, tx, pos, deadline_at, duplicate = rows[0]
    return Instance(
        stream_id, state, version, machine_version, Position(int(tx), pos), deadline_at, duplicate
    )


def transition(
    tenant: str,
    stream_id: str,
    event: str,
    *,
    expected_state: str | None,
    expected_version: int | None,
    lease_epoch: int | None,
    idempotency_key: str | None,
    actor: Mapping[str, Any] | None,
    reason: str | None,
    data: Mapping[str, Any] | None,
    release_lease: bool,
    event_id: uuid.UUID | None,
    causation_id: uuid.UUID | None,
    correlation_id: uuid.UUID | None,
    traceparent: str | None,
    raise_rejection: bool,
    max_data_bytes: int,
    record_as: str | None = None,
) -> Generator[Statement, list[Row], TransitionResult]:
    check_identifier(stream_id, "stream_id")
    check_identifier(event, "event", 100)
    for field, number in (("expected_version", expected_version), ("lease_epoch", lease_epoch)):
        if number is not None:
            check_count(number, field)
    rows = yield Statement(
        query("transition"),
        {
            "tenant": tenant,
            "stream_id": stream_id,
            "event": event,
            "expected_state": optional_text(expected_state, "expected_state", 100),
            "expected_version": expected_version,
            "idempotency_key": optional_text(idempotency_key, "idempotency_key", 200),
            "actor": encode_actor(actor),
            "reason": optional_text(reason, "reason", 10_000),
            "data": json_object_param(data, "data", max_data_bytes),
            "lease_epoch": lease_epoch,
            "traceparent": optional_text(traceparent, "traceparent", MAX_TRACEPARENT),
            # Time-ordered ids made here: new ids land at the event-id index's right edge.
            "event_id": _uuid(event_id, "event_id") or uuid7(),
            "causation_id": _uuid(causation_id, "causation_id"),
            "correlation_id": _uuid(correlation_id, "correlation_id"),
            "release_lease": _flag(release_lease, "release_lease"),
            # A rejection to raise comes back as a row and is raised here: same error,
            # without an ERROR's abort on the server and exception round on the client.
            "on_rejection": "return" if raise_rejection else "record",
            "record_as": optional_text(record_as, "record_as", 200),
        },
    )
    (
        outcome,
        code,
        message,
        from_state,
        to_state,
        version,
        tx,
        pos,
        epoch,
        deadline_at,
        lock_wait_us,
        detail,
    ) = rows[0]
    error: Rejected | None = None
    if outcome == "rejected":
        if raise_rejection:
            raise returned_refusal(code, message, detail)
        error = returned_refusal(code, message, detail)
    return TransitionResult(
        outcome=outcome,
        stream_id=stream_id,
        event=event,
        from_state=from_state,
        to_state=to_state,
        version=version,
        position=Position(int(tx), pos) if tx is not None else None,
        lease_epoch=epoch,
        deadline_at=deadline_at,
        lock_wait_us=lock_wait_us,
        error=error,
    )


def acquire_lease(
    tenant: str, stream_id: str, owner: str, ttl: timedelta
) -> Generator[Statement, list[Row], Lease]:
    check_identifier(stream_id, "stream_id")
    check_identifier(owner, "owner")
    rows = yield Statement(
        query("acquire_lease"),
        {"tenant": tenant, "stream_id": stream_id, "owner": owner, "ttl_ms": _ttl_ms(ttl)},
    )
    epoch, expires_at, version, state = rows[0]
    return Lease(stream_id, owner, epoch, expires_at, version, state)


def renew_lease(
    tenant: str, stream_id: str, owner: str, epoch: int, ttl: timedelta
) -> Generator[Statement, list[Row], Lease]:
    check_identifier(stream_id, "stream_id")
    check_identifier(owner, "owner")
    check_count(epoch, "epoch")
    rows = yield Statement(
        query("renew_lease"),
        {
            "tenant": tenant,
            "stream_id": stream_id,
            "owner": owner,
            "epoch": epoch,
            "ttl_ms": _ttl_ms(ttl),
        },
    )
    new_epoch, expires_at, version, state = rows[0]
    return Lease(stream_id, owner, new_epoch, expires_at, version, state)


def release_lease(
    tenant: str, stream_id: str, owner: str, epoch: int
) -> Generator[Statement, list[Row], None]:
    check_identifier(stream_id, "stream_id")
    check_identifier(owner, "owner")
    check_count(epoch, "epoch")
    yield Statement(
        query("release_lease"),
        {"tenant": tenant, "stream_id": stream_id, "owner": owner, "epoch": epoch},
    )


def fire_due_timeouts(limit: int) -> Generator[Statement, list[Row], list[FiredTimeout]]:
    rows = yield Statement(
        query("fire_due_timeouts"), {"limit": check_limit(limit, maximum=10_000)}
    )
    return [FiredTimeout(*row) for row in rows]


MIGRATION_BATCH = 500


def migrate_instances(
    tenant: str,
    machine: object,
    from_version: int,
    to_version: int,
    state_map: Mapping[str, str],
    actor: Mapping[str, Any] | None,
    after: str | None,
) -> Generator[Statement, list[Row], tuple[int, str | None]]:
    """One batch of instance migration: (how many moved, the last stream id handled)."""
    name, _ = _machine_name(machine)
    for field, number in (("from_version", from_version), ("to_version", to_version)):
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number < 2**31:
            raise InvalidInput(f"{field} must be a machine version number", detail={"field": field})
    if not isinstance(state_map, Mapping):
        raise InvalidInput(
            "state_map maps state names to state names", detail={"field": "state_map"}
        )
    for old_state, new_state in state_map.items():
        check_identifier(old_state, "state_map", 100)
        check_identifier(new_state, "state_map", 100)
    rows = yield Statement(
        query("migrate_instances"),
        {
            "tenant": tenant,
            "machine": name,
            "from_version": from_version,
            "to_version": to_version,
            "state_map": json.dumps(dict(state_map)),
            "actor": encode_actor(actor),
            "after": after,
            "limit": MIGRATION_BATCH,
        },
    )
    moved, last = rows[0]
    return int(moved), last


def find_in_state(
    tenant: str, machine: object, state: str, limit: int
) -> Generator[Statement, list[Row], list[str]]:
    name, _ = _machine_name(machine)
    rows = yield Statement(
        query("find_in_state"),
        {
            "tenant": tenant,
            "machine": name,
            "state": check_identifier(state, "state", 100),
            "limit": check_limit(limit),
        },
    )
    return [row[0] for row in rows]


def history(tenant: str, stream_id: str) -> Generator[Statement, list[Row], History]:
    events = yield from read_stream(tenant, stream_id, None, None, False)
    rows = yield Statement(query("rejections"), {"tenant": tenant, "stream_id": stream_id})
    return History(events, [RejectionRecord(*row) for row in rows])
