"""Sans-IO operations: each is a generator that yields statements, receives their rows and
returns a result. ``_driver.run`` and ``_driver.arun`` are the only code that does I/O, so
the sync and async stores share one implementation."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, LiteralString, TypeVar

from pydantic import ValidationError

from pgstate._json import loads, loads_each
from pgstate._sql import query
from pgstate.config import Settings
from pgstate.errors import InvalidInput, PositionNotInLog, returned_refusal
from pgstate.models import (
    NO_METADATA,
    AppendResult,
    ExpectedVersion,
    NewEvent,
    Page,
    Position,
    RecordedEvent,
    StreamAppend,
    StreamCondition,
    StreamState,
    encode_json_sized,
)

Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Statement:
    sql: LiteralString
    params: Mapping[str, Any]


Op = Generator[Statement, list[Row], Any]

MAX_STREAM_ID = 200
MAX_TYPES_FILTER = 1_000


def check_identifier(value: object, field: str, max_length: int = MAX_STREAM_ID) -> str:
    if not isinstance(value, str):
        raise InvalidInput(
            f"{field} must be a string, got {type(value).__name__}", detail={"field": field}
        )
    if not 1 <= len(value) <= max_length:
        raise InvalidInput(f"{field} must be 1 to {max_length} characters", detail={"field": field})
    if "\x00" in value:
        raise InvalidInput(f"{field} must not contain NUL characters", detail={"field": field})
    if value.isascii():  # a flag on the string: no copy, and no surrogate possible
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{field} is not valid Unicode", detail={"field": field}) from None
    return value


def optional_text(value: object, field: str, max_length: int) -> str | None:
    """None, or a checked identifier-like text (no NUL, valid Unicode, bounded length)."""
    if value is None:
        return None
    return check_identifier(value, field, max_length)


def check_count(value: object, field: str) -> int:
    """A non-negative int that fits a bigint (versions, epochs)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidInput(
            f"{field} must be an int from 0 to 2**63 - 1, got {value!r}", detail={"field": field}
        )
    return value


MAX_TRACEPARENT = 512


def expected_code(expected: object) -> int:
    """The wire form of an expected version: -1 any, -2 exists, 0 none, n exactly n."""
    if isinstance(expected, ExpectedVersion):
        return int(expected)
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise InvalidInput(
            f"expected_version must be an ExpectedVersion or an int >= 0, got {expected!r}",
            detail={"field": "expected_version"},
        )
    if not 0 <= expected < 2**63:
        raise InvalidInput(
            f"expected_version must be from 0 to 2**63 - 1, got {expected}",
            detail={"field": "expected_version"},
        )
    return expected


def check_limit(limit: object, field: str = "limit", maximum: int = 100_000) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= maximum:
        raise InvalidInput(f"{field} must be an int from 1 to {maximum}", detail={"field": field})
    return limit


def coerce_events(events: object, settings: Settings) -> list[NewEvent]:
    if isinstance(events, NewEvent | Mapping | str | bytes) or not isinstance(events, Sequence):
        raise InvalidInput("events must be a list of NewEvent", detail={"field": "events"})
    if not events:
        raise InvalidInput("an append needs at least one event", detail={"field": "events"})
    if len(events) > settings.max_batch:
        raise InvalidInput(
            f"a batch holds at most {settings.max_batch} events", detail={"field": "events"}
        )
    coerced: list[NewEvent] = []
    total = 0
    for given in events:
        try:
            if isinstance(given, Mapping):
                event = NewEvent.model_validate(given)
            elif isinstance(given, NewEvent):
                event = given.validated()
            else:
                raise InvalidInput("events must be NewEvent instances", detail={"field": "events"})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidInput(
                f"invalid event: {first['msg']}",
                detail={"field": "events", "at": ".".join(str(part) for part in first["loc"])},
            ) from None
        size = event.encoded_size
        if size > settings.max_event_bytes:
            raise InvalidInput(
                f"event {event.type!r} is {size} bytes, over the limit of "
                f"{settings.max_event_bytes}",
                detail={"field": "events", "size": size, "limit": settings.max_event_bytes},
            )
        total += size
        if total > settings.max_batch_bytes:
            raise InvalidInput(
                f"the batch's events are over {settings.max_batch_bytes} bytes together",
                detail={"field": "events", "limit": settings.max_batch_bytes},
            )
        coerced.append(event)
    if len({event.event_id for event in coerced}) != len(coerced):
        raise InvalidInput("an event id appears twice in the batch", detail={"field": "events"})
    return coerced


# An actor names who acted; it is stored with every event of the call and every rejection.
MAX_ACTOR_BYTES = 65_536


def json_object_param(value: Mapping[str, Any] | None, field: str, max_bytes: int) -> str | None:
    """A JSON object argument as jsonb text, refused (InvalidInput about ``field``) when it
    is not a strict JSON object or is over ``max_bytes`` in UTF-8."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{field} must be a JSON object", detail={"field": field})
    try:
        text, size = encode_json_sized(dict(value), field)
    except ValueError as exc:
        raise InvalidInput(str(exc), detail={"field": field}) from None
    if size > max_bytes:
        raise InvalidInput(
            f"{field} is {size} bytes, over the limit of {max_bytes}",
            detail={"field": field, "size": size, "limit": max_bytes},
        )
    return text


def encode_actor(actor: Mapping[str, Any] | None) -> str | None:
    return json_object_param(actor, "actor", MAX_ACTOR_BYTES)


def position_params(after: Position | str | None) -> dict[str, Any]:
    if after is None:
        return {"tx": "0", "pos": 0}
    if isinstance(after, str):
        try:
            after = Position.parse(after)
        except ValueError as exc:
            raise InvalidInput(str(exc), detail={"field": "after"}) from None
    if not isinstance(after, Position):
        raise InvalidInput(
            "after must be a Position, a 'tx:pos' string or None", detail={"field": "after"}
        )
    if not all(type(part) is int for part in after):
        raise InvalidInput(f"a position holds two ints, got {after!r}", detail={"field": "after"})
    if not (0 <= after.tx < 2**64 and 0 <= after.pos < 2**63):
        raise InvalidInput(f"after is out of range: {after!r}", detail={"field": "after"})
    return {"tx": str(after.tx), "pos": after.pos}


def check_interval(value: object, field: str) -> float:
    """A number of seconds to pause between polls: more than 0 (0 or less would poll
    without pause), at most an hour, and not NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise InvalidInput(
            f"{field} must be a number of seconds in (0, 3600]", detail={"field": field}
        )
    return float(value)


def checked_wait(position: object, timeout: object) -> Position:
    """The position to wait for (a Position or a 'tx:pos' string), once the timeout is
    known to be a finite number of seconds >= 0: a NaN deadline would never pass."""
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 <= timeout < float("inf")
    ):
        raise InvalidInput(
            "timeout must be a finite number of seconds >= 0", detail={"field": "timeout"}
        )
    params = position_params(position)  # type: ignore[arg-type]
    if position is None:
        raise InvalidInput("give the position to wait for", detail={"field": "position"})
    return Position(int(params["tx"]), params["pos"])


def append_statement(
    tenant: str,
    stream_id: str,
    events: list[NewEvent],
    expected: int,
    actor: str | None,
    traceparent: str | None,
    abort_on_conflict: bool,
) -> Statement:
    """The statement of one stream's append. A version conflict comes back as a row that
    append_result raises, which leaves the transaction open, or with ``abort_on_conflict``
    as an ERROR, which aborts it."""
    if len(events) == 1:
        return append_one_statement(
            tenant, stream_id, events[0], expected, actor, traceparent, abort_on_conflict
        )
    # Unused optional columns go as NULL (cheapest to send); unnest pads them with NULLs.
    encoded = [e.encoded for e in events]
    metadata = [item[1] for item in encoded]
    return Statement(
        query("append"),
        {
            "tenant": tenant,
            "stream_id": stream_id,
            "expected": expected,
            "event_ids": [e.event_id for e in events],
            "types": [e.type for e in events],
            "data": [item[0] for item in encoded],
            "metadata": None if all(m == "{}" for m in metadata) else metadata,
            "schema_versions": None
            if all(e.schema_version == 1 for e in events)
            else [e.schema_version for e in events],
            "causation_ids": None
            if all(e.causation_id is None for e in events)
            else [e.causation_id for e in events],
            "correlation_ids": None
            if all(e.correlation_id is None for e in events)
            else [e.correlation_id for e in events],
            "actor": actor,
            "traceparent": traceparent,
            "on_conflict": "raise" if abort_on_conflict else "return",
        },
    )


def append_one_statement(
    tenant: str,
    stream_id: str,
    event: NewEvent,
    expected: int,
    actor: str | None,
    traceparent: str | None,
    abort_on_conflict: bool,
) -> Statement:
    # The common single-event call, as scalars: no arrays to dump or unpack.
    data, metadata, _ = event.encoded
    return Statement(
        query("append_one"),
        {
            "tenant": tenant,
            "stream_id": stream_id,
            "expected": expected,
            "event_id": event.event_id,
            "type": event.type,
            "data": data,
            "metadata": None if metadata == "{}" else metadata,
            "schema_version": None if event.schema_version == 1 else event.schema_version,
            "causation_id": event.causation_id,
            "correlation_id": event.correlation_id,
            "actor": actor,
            "traceparent": traceparent,
            "on_conflict": "raise" if abort_on_conflict else "return",
        },
    )


def append_result(stream_id: str, row: Row) -> AppendResult:
    """The result of an append's row; a conflict returned as a row (one event or a batch)
    is raised here as the error the server would have raised."""
    if row[6] is not None:
        raise returned_refusal(row[6], row[7], row[8])
    from_version, to_version, tx, first_pos, last_pos, duplicate = row[:6]
    tx_int = int(tx)
    return AppendResult(
        stream_id=stream_id,
        from_version=from_version,
        version=to_version,
        first_position=Position(tx_int, first_pos),
        last_position=Position(tx_int, last_pos),
        duplicate=bool(duplicate),
    )


def append(
    settings: Settings,
    tenant: str,
    stream_id: str,
    events: Sequence[NewEvent],
    expected_version: ExpectedVersion | int,
    actor: Mapping[str, Any] | None,
    traceparent: str | None,
) -> Generator[Statement, list[Row], AppendResult]:
    check_identifier(stream_id, "stream_id")
    statement = append_statement(
        tenant,
        stream_id,
        coerce_events(events, settings),
        expected_code(expected_version),
        encode_actor(actor),
        optional_text(traceparent, "traceparent", MAX_TRACEPARENT),
        abort_on_conflict=False,
    )
    rows = yield statement
    return append_result(stream_id, rows[0])


Item = TypeVar("Item")


def _items_of(given: object, field: str, kind: type[Item]) -> list[Item]:
    """``given`` as a list of ``kind`` (a generator is read once, here), or InvalidInput."""
    if isinstance(given, str | bytes | Mapping) or not isinstance(given, Iterable):
        raise InvalidInput(f"{field} must be a list", detail={"field": field})
    items = list(given)
    for item in items:
        if not isinstance(item, kind):
            raise InvalidInput(
                f"{field} holds {kind.__name__} items, got {type(item).__name__}",
                detail={"field": field},
            )
    return items


def append_many(
    settings: Settings,
    tenant: str,
    appends: Iterable[StreamAppend],
    conditions: Iterable[StreamCondition],
    actor: Mapping[str, Any] | None,
    traceparent: str | None,
) -> Generator[Statement, list[Row], list[AppendResult]]:
    appends = _items_of(appends, "appends", StreamAppend)
    conditions = _items_of(conditions, "conditions", StreamCondition)
    if not appends:
        raise InvalidInput("append_many needs at least one stream", detail={"field": "appends"})
    actor_json = encode_actor(actor)
    traceparent = optional_text(traceparent, "traceparent", MAX_TRACEPARENT)
    seen: set[str] = set()
    work: list[tuple[str, int, Statement]] = []
    checks: list[tuple[str, Statement]] = []
    for item in appends:
        stream_id = check_identifier(item.stream_id, "stream_id")
        if stream_id in seen:
            raise InvalidInput(f"stream {stream_id!r} appears twice", detail={"field": "appends"})
        seen.add(stream_id)
        statement = append_statement(
            tenant,
            stream_id,
            coerce_events(item.events, settings),
            expected_code(item.expected_version),
            actor_json,
            traceparent,
            # A conflict must abort the whole write, the streams appended before it too.
            abort_on_conflict=True,
        )
        work.append((stream_id, len(work), statement))
    for condition in conditions:
        stream_id = check_identifier(condition.stream_id, "stream_id")
        if stream_id in seen:
            raise InvalidInput(
                f"stream {stream_id!r} is both written and a condition",
                detail={"field": "conditions"},
            )
        seen.add(stream_id)
        params = {
            "tenant": tenant,
            "stream_id": stream_id,
            "expected": expected_code(condition.expected_version),
        }
        checks.append((stream_id, Statement(query("check_version"), params)))
    # Every writer locks streams in the same order, so two multi-stream appends never
    # deadlock; all locks first, before the first write gives this transaction its id:
    # otherwise a writer that committed on a later stream meanwhile would be newer, and the
    # append to that stream would have to be refused to keep readers' per-stream order.
    yield Statement(query("lock_streams"), {"tenant": tenant, "stream_ids": sorted(seen)})
    results: dict[int, AppendResult] = {}
    for stream_id, index, statement in sorted(work, key=lambda item: item[0]):
        rows = yield statement
        results[index] = append_result(stream_id, rows[0])
    # The conditions after the writes, under the same locks: a retry of a write stored
    # whole is answered from the log, as its conditions held when it was stored and may
    # have moved on since (a refusal would say "nothing stored" about a stored write).
    if not all(result.duplicate for result in results.values()):
        for _, statement in sorted(checks, key=lambda item: item[0]):
            yield statement
    return [results[index] for index in range(len(appends))]


# The read path builds one event per row: tuple.__new__ skips the named tuples' Python-level
# __new__ (their fields are all given here, in order), about 0.3 us of 1.7 per event.
_new_tuple = tuple.__new__


def records(rows: list[Row]) -> list[RecordedEvent]:
    """RecordedEvents from rows of the read statements (JSON columns come as text, tx as
    an int: every connection that reads events has the xid8 loader). The data of the whole
    page is decoded in one call, which scans the page once for the rare huge integer, and
    so is the metadata of the events that have some (a transition's audit trail)."""
    datas = loads_each([row[6] for row in rows])
    metadata_texts = [row[7] for row in rows]
    given = [text for text in metadata_texts if text is not None]
    if given:
        decoded = iter(loads_each(given))
        metadatas = [NO_METADATA if text is None else next(decoded) for text in metadata_texts]
    else:
        metadatas = [NO_METADATA] * len(rows)
    return [
        _new_tuple(
            RecordedEvent,
            (
                _new_tuple(Position, (tx, pos)),
                tenant,
                stream_id,
                version,
                event_type,
                data,
                metadata,
                event_id,
                schema_version,
                causation_id,
                correlation_id,
                None if actor is None else loads(actor),
                traceparent,
                machine_version,
                recorded_at,
            ),
        )
        for (
            tx,
            pos,
            tenant,
            stream_id,
            version,
            event_type,
            _,
            _,
            event_id,
            schema_version,
            causation_id,
            correlation_id,
            actor,
            traceparent,
            machine_version,
            recorded_at,
        ), data, metadata in zip(rows, datas, metadatas, strict=True)
    ]


def record(row: Row) -> RecordedEvent:
    """One RecordedEvent from a row of the read statements."""
    return records([row])[0]


def read_stream(
    tenant: str,
    stream_id: str,
    from_version: int | None,
    limit: int | None,
    backwards: bool,
) -> Generator[Statement, list[Row], list[RecordedEvent]]:
    check_identifier(stream_id, "stream_id")
    if from_version is not None and (
        isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 0
    ):
        raise InvalidInput("from_version must be an int >= 0", detail={"field": "from_version"})
    if limit is not None:
        check_limit(limit, maximum=2**31 - 1)
    start = from_version
    if start is None:
        start = 2**62 if backwards else 1
    rows = yield Statement(
        query("read_stream_backward" if backwards else "read_stream_forward"),
        {"tenant": tenant, "stream_id": stream_id, "from_version": start, "limit": limit},
    )
    return records(rows)


def _types_param(types: Sequence[str] | None) -> list[str] | None:
    if types is None:
        return None
    if isinstance(types, str) or not isinstance(types, Sequence):
        raise InvalidInput("types must be a list of event type names", detail={"field": "types"})
    if not types or len(types) > MAX_TYPES_FILTER:
        raise InvalidInput(
            f"types must name 1 to {MAX_TYPES_FILTER} event types", detail={"field": "types"}
        )
    return [check_identifier(name, "types") for name in types]


def _page(rows: list[Row], after: Position | str | None) -> Page:
    events = records(rows)
    if events:
        return Page(events, events[-1].position)
    if isinstance(after, str):
        after = Position.parse(after)
    return Page(events, after)


def _filtered_page(rows: list[Row], after: Position | str | None, limit: int) -> Page:
    """A page of a type-filtered read, whose rows carry last the newest event stored below
    the statement's horizon (and a single row without an event when nothing matched). A
    page short of the limit saw every event up to that one, matched or not, so its cursor
    moves there."""
    scanned_tx, scanned_pos = rows[0][-2], rows[0][-1]
    page = _page([row[:-2] for row in rows if row[0] is not None], after)
    if len(page.events) == limit or scanned_tx is None:
        return page
    scanned = Position(int(scanned_tx), scanned_pos)
    # The cursor never moves back (an empty page keeps the caller's ``after``).
    if page.last_position is not None and page.last_position >= scanned:
        return page
    return Page(page.events, scanned)


def read_all(
    tenant: str,
    after: Position | str | None,
    limit: int,
    types: Sequence[str] | None,
) -> Generator[Statement, list[Row], Page]:
    params = position_params(after)
    params["tenant"] = tenant
    params["limit"] = check_limit(limit)
    type_names = _types_param(types)
    if type_names is None:
        rows = yield Statement(query("read_all"), params)
        return _page(rows, after)
    params["types"] = type_names
    rows = yield Statement(query("read_all_types"), params)
    return _filtered_page(rows, after, params["limit"])


def check_cursor(after: Position | str | None) -> Generator[Statement, list[Row], None]:
    """Raises PositionNotInLog unless ``after`` is None, a stored event's position, or
    before every stored event. Readers run it whenever they (re)connect: a cursor past
    events the server lost in a crash would otherwise skip what is stored below it next."""
    if after is None:
        return
    params = position_params(after)
    rows = yield Statement(query("cursor_in_log"), params)
    if not rows[0][0]:
        raise PositionNotInLog(Position(int(params["tx"]), params["pos"]))


def read_category(
    tenant: str,
    category: str,
    after: Position | str | None,
    limit: int,
    types: Sequence[str] | None,
) -> Generator[Statement, list[Row], Page]:
    params = position_params(after)
    params["tenant"] = tenant
    params["category"] = check_identifier(category, "category")
    params["limit"] = check_limit(limit)
    type_names = _types_param(types)
    if type_names is None:
        rows = yield Statement(query("read_category"), params)
        return _page(rows, after)
    params["types"] = type_names
    rows = yield Statement(query("read_category_types"), params)
    return _filtered_page(rows, after, params["limit"])


def stream_state(
    tenant: str, stream_id: str
) -> Generator[Statement, list[Row], StreamState | None]:
    check_identifier(stream_id, "stream_id")
    rows = yield Statement(query("stream_state"), {"tenant": tenant, "stream_id": stream_id})
    return StreamState(*rows[0]) if rows else None


def check_version(
    tenant: str, stream_id: str, expected_version: ExpectedVersion | int
) -> Generator[Statement, list[Row], int]:
    check_identifier(stream_id, "stream_id")
    rows = yield Statement(
        query("check_version"),
        {"tenant": tenant, "stream_id": stream_id, "expected": expected_code(expected_version)},
    )
    return int(rows[0][0])


def read_range(
    tx: int, first: int, last: int
) -> Generator[Statement, list[Row], list[RecordedEvent]]:
    """The events one transaction stored between two positions (for inline projections)."""
    rows = yield Statement(query("read_range"), {"tx": str(tx), "first": first, "last": last})
    return records(rows)


def watermark() -> Generator[Statement, list[Row], int]:
    """The oldest transaction id still running: every event below it is visible to readers."""
    rows = yield Statement(query("watermark"), {})
    return int(rows[0][0])
