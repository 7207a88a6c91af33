"""Folding a stream's events into a state, with snapshots so that only newer events are
folded. A snapshot is keyed by stream and by a hash of the fold's code, so changing the
fold invalidates its snapshots by itself."""

from __future__ import annotations

import hashlib
import inspect
import weakref
from collections.abc import Generator
from dataclasses import dataclass
from types import CodeType
from typing import Any

from pgstate._ops import Row, Statement, check_identifier, records
from pgstate._sql import query
from pgstate.errors import InvalidInput
from pgstate.models import JSONB_INT_FLOATS, RecordedEvent, encode_json

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
        name = self.name or cls.__qualname__
        text = f"{SNAPSHOT_FORMAT}\x00{name}\x00{self.version}\x00{_fold_code(cls)}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Part of every fold hash: raised when what a snapshot may hold changes, so snapshots
# written under older rules are no longer read. 2: only states made of JSON's own types
# (earlier, a state with integer keys was stored and read back with string keys). 3: no
# float of 1e16 or more (jsonb gave it back as an int).
SNAPSHOT_FORMAT = 3


# Once per class, weakly held (a class made at run time may go): reading the source costs
# a file stat and a tokenizer pass (about 270 µs), which every load_state would pay, on
# the event loop too for the async store.
_FOLD_CODE: weakref.WeakKeyDictionary[type[Fold], str] = weakref.WeakKeyDictionary()


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
    """The state as a snapshot's JSON. Refused (InvalidInput) unless it is made of JSON's
    own types only (dict with str keys, list, str, int, float, bool, None), so a later load
    that starts from the snapshot gets the state folding gives: a tuple, an int key, an
    enum or a defaultdict would come back as something else."""
    problem = _not_json(state, "state")
    if problem is not None:
        raise InvalidInput(
            f"the folded state cannot be snapshotted: {problem}", detail={"field": "state"}
        )
    try:
        return encode_json(state, "the folded state")
    except ValueError as exc:
        raise InvalidInput(str(exc), detail={"field": "state"}) from None


_JSON_SCALARS = (str, int, float, bool, type(None))


def _not_json(value: Any, where: str) -> str | None:
    """Where ``value`` holds something other than JSON's own types, or None."""
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return f"{where} has a key of type {type(key).__name__}"
            problem = _not_json(item, f"{where}[{key!r}]")
            if problem is not None:
                return problem
        return None
    if kind is list:
        for index, item in enumerate(value):
            problem = _not_json(item, f"{where}[{index}]")
            if problem is not None:
                return problem
        return None
    if kind is float and abs(value) >= JSONB_INT_FLOATS:
        # jsonb writes 1e16 as 10000000000000000, which reads back as an int.
        return f"{where} is a float that comes back from the database as an int: {value!r}"
    if kind in _JSON_SCALARS:
        return None
    return f"{where} is a {kind.__name__}"


def _code_fingerprint(code: CodeType) -> str:
    """Bytecode, names and constants, nested functions included; stable across processes
    of one Python version (a nested code object's repr carries its address, a frozenset's
    the order of its string hashes, which differ between processes)."""
    constants = "|".join(_constant_fingerprint(constant) for constant in code.co_consts)
    return f"{code.co_code.hex()}|{code.co_names}|{constants}"


def _constant_fingerprint(constant: object) -> str:
    if isinstance(constant, CodeType):
        return _code_fingerprint(constant)
    if isinstance(constant, frozenset):
        return "{" + ",".join(sorted(_constant_fingerprint(item) for item in constant)) + "}"
    if isinstance(constant, tuple):
        return "(" + ",".join(_constant_fingerprint(item) for item in constant) + ")"
    return repr(constant)


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
