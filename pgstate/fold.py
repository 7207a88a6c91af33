"""Folding a stream's events into a state, with snapshots so that only newer events are
folded. A snapshot is keyed by stream and by a hash of the fold's code, so changing the
fold invalidates its snapshots by itself."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Generator
from dataclasses import dataclass
from types import CodeType
from typing import Any

from pgstate._json import loads
from pgstate._ops import Row, Statement, check_identifier, records
from pgstate._sql import query
from pgstate.errors import InvalidInput
from pgstate.models import RecordedEvent, encode_json

PAGE = 10_000


class Fold:
    """Subclass with a ``name``, :meth:`initial` and :meth:`apply`. States are JSON objects
    (they are stored as jsonb snapshots). ``snapshot_every``: save a snapshot when a load
    folded at least this many events.

    Snapshots are keyed by :meth:`fold_hash`, which covers ``name``, ``version`` and the
    code of ``initial`` and ``apply`` themselves, not what they call: bump ``version`` when
    a helper they depend on changes what it computes."""

    name: str = ""
    version: str = "1"
    snapshot_every: int = 1000

    def initial(self) -> dict[str, Any]:
        return {}

    def apply(self, state: dict[str, Any], event: RecordedEvent) -> dict[str, Any]:
        raise NotImplementedError

    def fold_hash(self) -> str:
        """The fold's identity: name, version and the source of ``initial`` and ``apply``,
        or, where the source cannot be read (a REPL, ``exec``, a frozen application), their
        compiled code, so a change to either still invalidates the snapshots."""
        cls = type(self)
        text = f"{self.name or cls.__qualname__}\x00{self.version}\x00{_fold_code(cls)}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Once per class: reading the source costs a file stat and a tokenizer pass (about 270 µs),
# which every load_state would pay, on the event loop too for the async store.
_FOLD_CODE: dict[type[Fold], str] = {}


def _fold_code(cls: type[Fold]) -> str:
    code = _FOLD_CODE.get(cls)
    if code is None:
        try:
            code = inspect.getsource(cls.apply) + inspect.getsource(cls.initial)
        except (OSError, TypeError):
            code = "".join(
                _code_fingerprint(method.__code__)
                for method in (cls.apply, cls.initial)
                if isinstance(getattr(method, "__code__", None), CodeType)
            )
        _FOLD_CODE[cls] = code
    return code


def snapshot_text(state: dict[str, Any]) -> str:
    """The state as a snapshot's JSON, refused (InvalidInput) unless it reads back equal:
    a snapshot of a state with integer keys, tuples or other values JSON changes would
    hand later loads a different state than folding gives."""
    try:
        text = encode_json(state, "the folded state")
    except ValueError as exc:
        raise InvalidInput(
            f"{exc}; a fold's state must be a JSON object to be snapshotted",
            detail={"field": "state"},
        ) from None
    if loads(text) != state:
        raise InvalidInput(
            "the folded state does not read back equal from JSON (integer keys, tuples?);"
            " a snapshot would change it",
            detail={"field": "state"},
        )
    return text


def _code_fingerprint(code: CodeType) -> str:
    """Bytecode, names and constants, nested functions included; stable across processes
    of one Python version (a nested code object's repr would carry its address)."""
    constants = [
        _code_fingerprint(constant) if isinstance(constant, CodeType) else repr(constant)
        for constant in code.co_consts
    ]
    return f"{code.co_code.hex()}|{code.co_names}|{'|'.join(constants)}"


@dataclass(frozen=True, slots=True)
class FoldedState:
    state: dict[str, Any]
    version: int
    snapshot_version: int | None
    events_folded: int


def load_state(
    tenant: str, stream_id: str, fold: Fold, use_snapshot: bool
) -> Generator[Statement, list[Row], FoldedState]:
    check_identifier(stream_id, "stream_id")
    fold_hash = fold.fold_hash()
    state, version, snapshot_version = fold.initial(), 0, None
    if use_snapshot:
        rows = yield Statement(
            query("load_snapshot"),
            {"tenant": tenant, "stream_id": stream_id, "fold_hash": fold_hash},
        )
        if rows:
            version, state = rows[0]
            snapshot_version = version
    folded = 0
    while True:
        rows = yield Statement(
            query("read_stream_forward"),
            {"tenant": tenant, "stream_id": stream_id, "from_version": version + 1, "limit": PAGE},
        )
        for event in records(rows):
            state = fold.apply(state, event)
            version = event.version
        folded += len(rows)
        if len(rows) < PAGE:
            break
    if use_snapshot and folded >= fold.snapshot_every:
        yield Statement(
            query("save_snapshot"),
            {
                "tenant": tenant,
                "stream_id": stream_id,
                "fold_hash": fold_hash,
                "version": version,
                "state": snapshot_text(state),
            },
        )
    return FoldedState(state, version, snapshot_version, folded)
