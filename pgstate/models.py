"""Data models. Inputs are pydantic models (validated at the boundary); events read back
are named tuples, because the read path builds one per row and must stay close to the
cost of a bare tuple; other results are frozen slotted dataclasses."""

from __future__ import annotations

import enum
import json
import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, NamedTuple, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A JSON escape of NUL: "\u0000" preceded by an even number of backslashes (so not the
# text of a literal backslash followed by "u0000").
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_POSITION = re.compile(r"([0-9]{1,20}):([0-9]{1,19})")


class ExpectedVersion(enum.IntEnum):
    """What an append expects of the stream, besides an exact version (an int >= 0)."""

    ANY = -1
    STREAM_EXISTS = -2
    NO_STREAM = 0


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))

# From here on Python writes a float in exponent form, which jsonb stores as a plain integer
# and gives back as an int (1.152921504606847e+18 then reads as 1152921504606847000).
JSONB_INT_FLOATS = 1e16


def _float_jsonb_turns_into_an_int(value: Any) -> float | None:
    if isinstance(value, float):
        return value if abs(value) >= JSONB_INT_FLOATS else None
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list | tuple):
        return None
    for item in value:
        found = _float_jsonb_turns_into_an_int(item)
        if found is not None:
            return found
    return None


def encode_json(value: Any, what: str) -> str:
    """Strict JSON text for jsonb: no NaN or Infinity, no NUL (jsonb refuses \\u0000)."""
    return encode_json_sized(value, what)[0]


def encode_json_sized(value: Any, what: str) -> tuple[str, int]:
    """``encode_json`` and the text's size in UTF-8 bytes (the surrogate check encodes it
    anyway, and the append's size limit needs it)."""
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to encode") from None
    # The substring test is the cheap common case; the regex only rules out an escaped
    # backslash followed by the text "u0000".
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        raise ValueError(f"{what} contains a NUL character")
    # Only a text with an exponent can hold such a float: the walk is the rare path.
    if "e+" in text:
        large = _float_jsonb_turns_into_an_int(value)
        if large is not None:
            raise ValueError(
                f"{what} holds the float {large!r}, which the database would give back as "
                "an int: store it as a string, or as an int"
            )
    if text.isascii():
        return text, len(text)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} contains a lone surrogate, which is not Unicode") from None
    return text, size


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): 48 bits of Unix milliseconds, then 74
    random bits. New ids land at the right edge of the event-id index instead of on a
    random leaf page, so a large log's index stays cached and writes fewer pages."""
    millis = time.time_ns() // 1_000_000
    random_bits = int.from_bytes(os.urandom(10), "big")
    value = (
        (millis & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (random_bits >> 62 & 0xFFF) << 64
        | 0b10 << 62
        | random_bits & 0x3FFF_FFFF_FFFF_FFFF
    )
    return uuid.UUID(int=value)


class NewEvent(BaseModel):
    """An event to append. ``event_id`` makes retries idempotent: send the same ids again.

    ``data`` and ``metadata`` are encoded as JSON once, here: what is stored is what they
    held at construction (changing the dicts afterwards changes nothing stored), and JSON
    has only string keys and arrays, so int keys come back as strings and tuples as lists.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$")
    data: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    event_id: uuid.UUID = Field(default_factory=uuid7)
    schema_version: int = Field(default=1, ge=1, le=2**31 - 1)
    causation_id: uuid.UUID | None = None
    correlation_id: uuid.UUID | None = None

    # (data JSON, metadata JSON, their size in bytes) in a slot of its own: a pydantic
    # private attribute costs ~1.8 µs per read against ~0.1 µs here, three reads per append.
    __slots__ = ("_pgstate_encoded",)

    @field_validator("type")
    @classmethod
    def _type_is_unicode(cls, value: str) -> str:
        value.encode()  # a lone surrogate raises UnicodeEncodeError, a ValueError
        return value

    @model_validator(mode="after")
    def _encode(self) -> Self:
        # Encoded once here, so bad payloads fail at construction and appends reuse the text.
        object.__setattr__(self, "_pgstate_encoded", self._encoded_now())
        return self

    def _encoded_now(self) -> tuple[str, str, int]:
        data_json, data_size = encode_json_sized(self.data, "event data")
        if self.metadata:
            metadata_json, metadata_size = encode_json_sized(self.metadata, "event metadata")
        else:
            metadata_json, metadata_size = "{}", 2
        return data_json, metadata_json, data_size + metadata_size

    def validated(self) -> NewEvent:
        """This event; or, for a copy that skipped validation (``model_copy(update=...)``,
        a pickle: they carry the fields but not the encoded JSON), the copy validated."""
        try:
            object.__getattribute__(self, "_pgstate_encoded")
        except AttributeError:
            # The fields as they are (model_dump would serialize them, warning on bad ones).
            fields = {name: getattr(self, name) for name in NewEvent.model_fields}
            return NewEvent.model_validate(fields)
        return self

    @property
    def encoded(self) -> tuple[str, str, int]:
        """The data JSON, the metadata JSON and their size in UTF-8 bytes."""
        try:
            encoded: tuple[str, str, int] = object.__getattribute__(self, "_pgstate_encoded")
        except AttributeError:
            # A copy (model_copy, pickle) carries the fields but not the slot.
            encoded = self._encoded_now()
            object.__setattr__(self, "_pgstate_encoded", encoded)
        return encoded

    @property
    def encoded_size(self) -> int:
        """Bytes of the data and metadata JSON, as the append's size limit counts them."""
        return self.encoded[2]

    @property
    def data_json(self) -> str:
        return self.encoded[0]

    @property
    def metadata_json(self) -> str:
        return self.encoded[1]


class Position(NamedTuple):
    """A place in the global log: the writing transaction's id and the row's sequence number.
    Commit order is ``(tx, pos)`` order below the watermark. A named tuple, because the
    read path builds one per event."""

    tx: int
    pos: int

    def __str__(self) -> str:
        return f"{self.tx}:{self.pos}"

    @classmethod
    def parse(cls, text: str) -> Position:
        match = _POSITION.fullmatch(text)
        if match is None or int(match[1]) >= 2**64 or int(match[2]) >= 2**63:
            raise ValueError(f"a position looks like 'tx:pos', got {text!r}")
        return cls(int(match[1]), int(match[2]))


START = Position(0, 0)


# Shared by every event without metadata: read-only, and one object instead of one per row.
NO_METADATA: Mapping[str, Any] = MappingProxyType({})


class RecordedEvent(NamedTuple):
    """An event as stored. A named tuple: the read path builds one per row, and a tuple is
    several times cheaper to build than a frozen dataclass."""

    position: Position
    tenant: str
    stream_id: str
    version: int
    type: str
    data: dict[str, Any]
    metadata: Mapping[str, Any]
    event_id: uuid.UUID
    schema_version: int
    causation_id: uuid.UUID | None
    correlation_id: uuid.UUID | None
    actor: dict[str, Any] | None
    traceparent: str | None
    machine_version: int | None
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class AppendResult:
    """The outcome of an append. ``duplicate`` is True when the events were already stored
    by an earlier attempt with the same ids, whose original result this is."""

    stream_id: str
    from_version: int
    version: int
    first_position: Position
    last_position: Position
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Page:
    """A page of the global log. Pass ``last_position`` as ``after`` to get the next one.
    It is the last event's position, except after a type-filtered read that came back
    short of its limit: then it is the position of the newest event the read scanned past
    (of another type, category or tenant), so the next read skips what the filter
    skipped."""

    events: list[RecordedEvent]
    last_position: Position | None

    def __iter__(self) -> Iterator[RecordedEvent]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)


@dataclass(frozen=True, slots=True)
class StreamState:
    """The head row of a stream: its version, and for machine instances state and lease."""

    tenant: str
    stream_id: str
    category: str
    version: int
    state: str | None
    machine: str | None
    machine_version: int | None
    lease_owner: str | None
    lease_epoch: int
    lease_expires_at: datetime | None
    deadline_at: datetime | None
    archived: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class StreamAppend:
    """One stream's part of a multi-stream append."""

    stream_id: str
    events: list[NewEvent]
    expected_version: ExpectedVersion | int = ExpectedVersion.ANY


@dataclass(frozen=True, slots=True)
class StreamCondition:
    """A condition on a stream that a multi-stream append reads but does not write."""

    stream_id: str
    expected_version: ExpectedVersion | int = field(default=ExpectedVersion.STREAM_EXISTS)


@dataclass(frozen=True, slots=True)
class MachineRegistration:
    """A machine definition stored as data. ``created`` is False when the newest stored
    version already had this definition."""

    name: str
    version: int
    def_hash: str
    created: bool


@dataclass(frozen=True, slots=True)
class Instance:
    """A machine instance just created (or found created by an earlier attempt)."""

    stream_id: str
    state: str
    version: int
    machine_version: int
    position: Position
    deadline_at: datetime | None
    duplicate: bool


@dataclass(frozen=True, slots=True)
class TransitionResult:
    """The outcome of a transition: ``applied``, ``duplicate`` (an earlier attempt with the
    same idempotency key applied it; this is its result) or ``rejected`` (only from
    ``try_transition``, with the typed error in ``error``). ``lock_wait_us`` is how long
    the call waited for the stream's lock, in microseconds: 0 when no one held it."""

    outcome: str
    stream_id: str
    event: str
    from_state: str | None
    to_state: str | None
    version: int | None
    position: Position | None
    lease_epoch: int | None
    deadline_at: datetime | None
    lock_wait_us: int | None
    error: Exception | None = None

    @property
    def applied(self) -> bool:
        return self.outcome != "rejected"


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease on an instance. Pass ``epoch`` as ``lease_epoch`` to fence transitions."""

    stream_id: str
    owner: str
    epoch: int
    expires_at: datetime
    version: int
    state: str | None


@dataclass(frozen=True, slots=True)
class FiredTimeout:
    tenant: str
    stream_id: str
    event: str
    from_state: str
    to_state: str
    version: int
    lease_epoch: int


@dataclass(frozen=True, slots=True)
class RejectionRecord:
    """A rejected attempt recorded by ``try_transition``."""

    id: int
    event: str
    code: str
    message: str
    detail: dict[str, Any]
    actor: dict[str, Any] | None
    reason: str | None
    idempotency_key: str | None
    traceparent: str | None
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class History:
    """Everything that happened to a stream: its events (with actor, causation,
    correlation, traceparent and machine version; a transition's reason is in its
    metadata) and the rejections recorded for audit."""

    events: list[RecordedEvent]
    rejections: list[RejectionRecord]
