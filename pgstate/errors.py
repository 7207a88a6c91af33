"""Exception tree. Rejections raised in SQL carry SQLSTATE class ``SM`` and a JSON DETAIL
holding the stream's current head row; :func:`translate` turns them into these classes."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import psycopg


class PgStateError(Exception):
    """Base of every error pgstate raises."""

    sqlstate: str | None = None

    def __init__(
        self, message: str, *, sqlstate: str | None = None, detail: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if sqlstate is not None:
            self.sqlstate = sqlstate
        self.detail: dict[str, Any] = detail or {}

    # The head row of the stream at the moment of the rejection.
    @property
    def tenant(self) -> str | None:
        return self.detail.get("tenant")

    @property
    def stream_id(self) -> str | None:
        return self.detail.get("stream_id")

    @property
    def current_version(self) -> int | None:
        return self.detail.get("version")

    @property
    def current_state(self) -> str | None:
        return self.detail.get("state")

    @property
    def lease_owner(self) -> str | None:
        return self.detail.get("lease_owner")

    @property
    def lease_epoch(self) -> int | None:
        return self.detail.get("lease_epoch")

    @property
    def deadline_at(self) -> str | None:
        return self.detail.get("deadline_at")

    @property
    def expected_version(self) -> int | None:
        return self.detail.get("expected_version")

    @property
    def expected_state(self) -> str | None:
        return self.detail.get("expected_state")

    @property
    def retryable(self) -> bool:
        """True when the same request may simply be sent again."""
        return False


class Rejected(PgStateError):
    """A write refused by one of pgstate's checks (SQLSTATE class SM)."""

    code: ClassVar[str]


class NotFound(Rejected):
    code = sqlstate = "SM001"


class IllegalTransition(Rejected):
    code = sqlstate = "SM002"


class StaleState(Rejected):
    """The expected state differs: re-read and decide again; never retry blindly."""

    code = sqlstate = "SM003"


class VersionConflict(Rejected):
    """The expected version differs: re-read and decide again; never retry blindly."""

    code = sqlstate = "SM004"


class LeaseLost(Rejected):
    code = sqlstate = "SM005"


class IdempotencyKeyReused(Rejected):
    code = sqlstate = "SM006"


class DeadlinePassed(Rejected):
    code = sqlstate = "SM007"


class TerminalState(Rejected):
    code = sqlstate = "SM008"


class UnknownDefinition(Rejected):
    code = sqlstate = "SM009"


class LeaseHeld(Rejected):
    code = sqlstate = "SM010"


class GuardRejected(Rejected):
    code = sqlstate = "SM011"


class InvalidInput(Rejected, ValueError):
    """Bad identifier, payload or argument. Raised before anything is stored."""

    code = sqlstate = "SM012"


REJECTIONS: dict[str, type[Rejected]] = {
    cls.code: cls
    for cls in (
        NotFound,
        IllegalTransition,
        StaleState,
        VersionConflict,
        LeaseLost,
        IdempotencyKeyReused,
        DeadlinePassed,
        TerminalState,
        UnknownDefinition,
        LeaseHeld,
        GuardRejected,
        InvalidInput,
    )
}


def returned_refusal(code: str, message: str, detail: dict[str, Any] | None) -> Rejected:
    """The typed error for a refusal a write function returned as a row (code, message and
    detail), the same one :func:`translate` makes from the raised error. Callers raise the
    result directly: kept in a local of the raising frame, an exception would reach back to
    its own traceback, a cycle that only the garbage collector frees."""
    return REJECTIONS[code](message, sqlstate=code, detail=detail)


class DatabaseError(PgStateError):
    """Any other driver error, with its SQLSTATE kept."""


class TransientError(DatabaseError):
    """The server rolled the transaction back and nothing of it was stored: the whole
    transaction may be sent again (pgstate itself never retries)."""

    @property
    def retryable(self) -> bool:
        return True


class SerializationFailure(TransientError):
    sqlstate = "40001"


class DeadlockDetected(TransientError):
    sqlstate = "40P01"


class LockTimeout(TransientError):
    sqlstate = "55P03"


class PermissionDenied(DatabaseError):
    """The role lacks the privilege: the operator's calls (``migrate_instances``, the
    notification mode, ``retry_parked``, ``rebuild``) need ``pgstate_admin``."""

    sqlstate = "42501"


class ConnectionLost(DatabaseError):
    """The connection broke. Not a :class:`TransientError`: the outcome of an in-flight
    commit is unknown, so only a request that is idempotent by its ids (the same event ids
    for an append, the same idempotency key for a transition) may be sent again; its retry
    then reports the stored outcome instead of writing twice."""


class PositionNotInLog(PgStateError):
    """A reader's cursor (a listener's position, a projection's checkpoint) names an event
    the log does not hold, and is not before the log's start. Either the server lost
    events it had shown to readers (a crash after commits made with ``synchronous_commit``
    off) or the position comes from another database. Reading on from it could skip
    events stored below it later, so the reader stops instead: rebuild the projection, or
    choose the position again."""

    def __init__(self, position: object) -> None:
        super().__init__(
            f"no event is stored at position {position}, and the log holds events before it:"
            " the server lost events readers had seen (a crash after asynchronous commits)"
            " or the position is from another database",
            detail={"position": str(position)},
        )
        self.position = position


_TRANSIENT: dict[str, type[TransientError]] = {
    "40001": SerializationFailure,
    "40P01": DeadlockDetected,
    "55P03": LockTimeout,
}

# Unique-key backstops: if a check is ever bypassed, the constraint still refuses, and the
# refusal reaches the caller as the same typed error the check would have raised.
_CONSTRAINTS: dict[str, type[Rejected]] = {
    "events_event_id_key": IdempotencyKeyReused,
}
# Writers of a stream wait for its lock, then read its head afresh, so these two keys only
# refuse a writer whose snapshot is older than the head: a REPEATABLE READ or SERIALIZABLE
# transaction that began before another writer committed. Like the server's own
# serialization failures, the answer is to run the whole transaction again.
_STALE_SNAPSHOT_CONSTRAINTS = frozenset({"events_stream_version_key", "streams_pkey"})


def _parse_detail(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"text": text}
    return value if isinstance(value, dict) else {"value": value}


def translate(error: BaseException) -> PgStateError:
    """Map a driver exception to pgstate's tree; anything unknown keeps its SQLSTATE."""
    if isinstance(error, PgStateError):
        return error
    if isinstance(error, psycopg.Error):
        diag = error.diag
        sqlstate = diag.sqlstate or getattr(error, "sqlstate", None)
        message = diag.message_primary or str(error)
        rejection = REJECTIONS.get(sqlstate or "")
        if rejection is not None:
            return rejection(message, sqlstate=sqlstate, detail=_parse_detail(diag.message_detail))
        if sqlstate == "23505" and diag.constraint_name in _CONSTRAINTS:
            backstop = _CONSTRAINTS[diag.constraint_name]
            return backstop(message, sqlstate=sqlstate, detail={"constraint": diag.constraint_name})
        if sqlstate == "23505" and diag.constraint_name in _STALE_SNAPSHOT_CONSTRAINTS:
            return SerializationFailure(
                "the stream moved on after this transaction's snapshot was taken; run the "
                "whole transaction again",
                sqlstate=SerializationFailure.sqlstate,
                detail={"constraint": diag.constraint_name, "server_message": message},
            )
        if sqlstate == PermissionDenied.sqlstate:
            return PermissionDenied(message, sqlstate=sqlstate)
        transient = _TRANSIENT.get(sqlstate or "")
        if transient is not None:
            return transient(message, sqlstate=sqlstate, detail=_parse_detail(diag.message_detail))
        if isinstance(error, psycopg.OperationalError) and (
            sqlstate is None or sqlstate.startswith("08") or sqlstate.startswith("57P")
        ):
            return ConnectionLost(message, sqlstate=sqlstate)
        if isinstance(error, psycopg.DataError) and sqlstate is None:
            # Raised client-side before sending, e.g. a NUL byte in a text value.
            return InvalidInput(message, sqlstate=InvalidInput.code)
        return DatabaseError(message, sqlstate=sqlstate)
    return DatabaseError(str(error))
