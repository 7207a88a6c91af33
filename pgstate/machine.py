"""Declaring, validating and compiling state machines.

A machine is declared as a :class:`Machine` subclass (or loaded from YAML/JSON data) and is
checked when the class is created. It compiles to a canonical definition dict whose
SHA-256 (:meth:`Machine.def_hash`) identifies the machine version in the database.

Python::

    class Ticket(Machine):
        new = State(initial=True)
        working = State(timeout=timedelta(minutes=5), on_timeout="give_up")
        done = State(final=True)
        start = new.to(working, requires_lease=True)
        finish = working.to(done, guard=Guard(payload=Result, actor_kinds=["worker"]))
        give_up = working.to(new)
        cancel = new.to(done) | working.to(done)

Canonical definition (``Machine.definition()``)::

    {"name": str, "initial": str,
     "states": {state: {"final": bool, "timeout_ms": int | None, "on_timeout": str | None}},
     "edges": [{"event": str, "from": str, "to": str, "requires_lease": bool,
                "guard": dict | None}, ...]}      # edges sorted by (event, from)

Compiled guard (checked in the database, so it must be declarative)::

    {"payload": {"required": [key, ...],
                 "properties": {key: {"types": [...], "enum": [...]}},
                 "additional": bool},
     "actor_kinds": [kind, ...]}

``payload`` and ``actor_kinds`` are each omitted when unconstrained, as are ``types`` and
``enum`` of a property. ``types`` uses the ``jsonb_typeof`` vocabulary (string, number,
boolean, object, array, null). A payload guard means: the payload is a JSON object; every
``required`` key is present; every present key listed in ``properties`` has a JSON type in
``types`` and a value equal to one of ``enum`` (when given); with ``additional`` false no
other keys are allowed. ``actor_kinds`` means: the actor's kind is one of them. Lists are
sorted and deduplicated so equal guards hash equally.

Data documents (YAML/JSON) for :func:`machine_from_dict`::

    name: Ticket
    states:
      new: {initial: true}
      working: {timeout: 5m, on_timeout: give_up}   # seconds, or "250ms", "300s", "1h30m", "2d"
      done: {final: true}
    transitions:
      - {event: start, from: new, to: working, requires_lease: true}
      - {event: finish, from: working, to: done, guard: {actor_kinds: [worker]}}
      - {event: give_up, from: working, to: new}
      - {event: cancel, from: [new, working], to: done}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel

__all__ = [
    "JSON_TYPES",
    "MACHINE_NAME_RE",
    "NAME_RE",
    "Edge",
    "Guard",
    "Machine",
    "MachineDefinitionError",
    "State",
    "StateInfo",
    "Transition",
    "Transitions",
    "format_duration",
    "load_machine",
    "machine_from_definition",
    "machine_from_dict",
    "machine_from_json",
    "machine_from_yaml",
    "parse_duration",
]

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Machine names default to the class name, so capitals are allowed; dots and dashes allow
# namespacing. The same pattern as register_machine_v1's on the server.
MACHINE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,99}$")
# The longest state timeout: a deadline is a timestamp, and one beyond the server's range
# would make every create or transition into that state fail. The server checks the same.
MAX_TIMEOUT = timedelta(days=36_500)
JSON_TYPES: frozenset[str] = frozenset({"string", "number", "boolean", "object", "array", "null"})


class MachineDefinitionError(ValueError):
    """A machine, guard or machine document is invalid.

    ``problems`` lists every problem found; the message contains all of them."""

    def __init__(self, message: str, problems: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems is not None else [message]


# --------------------------------------------------------------------------------------------
# Durations

# Largest first: format_duration relies on this order.
_DURATION_UNITS_MS: dict[str, int] = {
    "d": 86_400_000,
    "h": 3_600_000,
    "m": 60_000,
    "s": 1000,
    "ms": 1,
}
_DURATION_FULL_RE = re.compile(r"(?:\s*\d+(?:\.\d+)?\s*(?:ms|s|m|h|d))+\s*")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")


def _whole_ms(value: Decimal, shown: object) -> timedelta:
    if value != value.to_integral_value():
        raise MachineDefinitionError(f"duration {shown!r} is not a whole number of milliseconds")
    return _milliseconds(int(value), shown)


def _milliseconds(count: int, shown: object) -> timedelta:
    if abs(count) > _timedelta_ms(MAX_TIMEOUT):
        raise MachineDefinitionError(f"duration {shown!r} is longer than {MAX_TIMEOUT.days} days")
    return timedelta(milliseconds=count)


def parse_duration(value: str | int | float) -> timedelta:
    """Parse ``"300s"``, ``"5m"``, ``"1h30m"``, ``"250ms"``, ``"2d"`` or a number of seconds.

    Decimal arithmetic keeps e.g. ``"0.1s"`` exactly 100 ms, so hashes do not drift."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise MachineDefinitionError(
            f"duration must be a number of seconds or a string like '5m', got {value!r}"
        )
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise MachineDefinitionError(f"duration must be finite, got {value!r}")
        return _whole_ms(Decimal(str(value)) * 1000, value)
    if not value.strip() or not _DURATION_FULL_RE.fullmatch(value):
        raise MachineDefinitionError(
            f"cannot parse duration {value!r} (use e.g. '250ms', '300s', '5m', '1h30m', '2d')"
        )
    total = sum(
        (
            Decimal(number) * _DURATION_UNITS_MS[unit]
            for number, unit in _DURATION_PART_RE.findall(value)
        ),
        Decimal(0),
    )
    return _whole_ms(total, value)


def format_duration(ms: int) -> str:
    """Format milliseconds compactly (``300000`` -> ``"5m"``); inverse of :func:`parse_duration`."""
    if ms <= 0:
        return f"{ms}ms"
    parts: list[str] = []
    rest = ms
    for unit, size in _DURATION_UNITS_MS.items():
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _timedelta_ms(value: timedelta) -> int:
    # Integer arithmetic: timedelta.total_seconds() is a float and may round.
    micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    return micros // 1000


# --------------------------------------------------------------------------------------------
# Guards


def _is_json_value(value: object) -> bool:
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_json_value(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_value(v) for k, v in value.items())
    return False


def _json_type_of(value: object) -> str:
    """The ``jsonb_typeof`` of a JSON-compatible Python value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _check_keys(data: Mapping[Any, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise MachineDefinitionError(
                f"{where}: unknown key {key!r} (expected one of: {', '.join(sorted(allowed))})"
            )


def _normalize_property(spec: object, here: str) -> dict[str, Any]:
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise MachineDefinitionError(f"{here}: expected a mapping, got {type(spec).__name__}")
    _check_keys(spec, ("types", "enum"), here)
    prop: dict[str, Any] = {}
    if "types" in spec:
        types = spec["types"]
        if not isinstance(types, list) or not types:
            raise MachineDefinitionError(f"{here}.types: expected a non-empty list")
        for i, name in enumerate(types):
            if name not in JSON_TYPES:
                raise MachineDefinitionError(
                    f"{here}.types[{i}]: unknown type {name!r} "
                    f"(expected one of: {', '.join(sorted(JSON_TYPES))})"
                )
        prop["types"] = sorted(set(types))
    if "enum" in spec:
        enum = spec["enum"]
        if not isinstance(enum, list) or not enum:
            raise MachineDefinitionError(f"{here}.enum: expected a non-empty list")
        for i, item in enumerate(enum):
            if not _is_json_value(item):
                raise MachineDefinitionError(f"{here}.enum[{i}]: {item!r} is not a JSON value")
        # Sorted by canonical JSON so declaration order does not change the hash.
        unique = {_canonical(item): item for item in enum}
        prop["enum"] = [unique[k] for k in sorted(unique)]
        if "types" in prop:
            bad = [v for v in prop["enum"] if _json_type_of(v) not in prop["types"]]
            if bad:
                raise MachineDefinitionError(
                    f"{here}.enum: values {bad!r} do not match types {prop['types']!r}"
                )
    return prop


def _normalize_payload(raw: object, where: str) -> dict[str, Any]:
    """Validate a payload guard in compiled form and return it in canonical form."""
    if not isinstance(raw, dict):
        raise MachineDefinitionError(f"{where}: expected a mapping, got {type(raw).__name__}")
    _check_keys(raw, ("required", "properties", "additional"), where)

    required_raw = raw.get("required", [])
    if not isinstance(required_raw, list):
        raise MachineDefinitionError(f"{where}.required: expected a list of keys")
    for i, key in enumerate(required_raw):
        if not isinstance(key, str) or not key:
            raise MachineDefinitionError(f"{where}.required[{i}]: expected a non-empty string")
    required = sorted(set(required_raw))

    additional = raw.get("additional", True)
    if not isinstance(additional, bool):
        raise MachineDefinitionError(f"{where}.additional: expected true or false")

    props_raw = raw.get("properties", {})
    if not isinstance(props_raw, dict):
        raise MachineDefinitionError(f"{where}.properties: expected a mapping")
    properties: dict[str, Any] = {}
    for key, spec in props_raw.items():
        if not isinstance(key, str) or not key:
            raise MachineDefinitionError(f"{where}.properties: key {key!r} is not a string")
        properties[key] = _normalize_property(spec, f"{where}.properties.{key}")

    if not additional:
        missing = [key for key in required if key not in properties]
        if missing:
            raise MachineDefinitionError(
                f"{where}: required keys {missing!r} are not in properties, "
                "but additional is false so they could never be supplied"
            )
    return {"required": required, "properties": properties, "additional": additional}


# A property schema reduced to (allowed JSON types, allowed values); None means unconstrained.
_Shape = tuple[set[str] | None, list[Any] | None]


def _union_shapes(shapes: Sequence[_Shape]) -> _Shape:
    types: set[str] | None = set()
    for branch_types, _ in shapes:
        types = None if branch_types is None or types is None else types | branch_types
    enum: list[Any] | None = []
    for branch_types, branch_enum in shapes:
        if enum is None:
            break
        if branch_enum is not None:
            enum.extend(branch_enum)
        elif branch_types == {"null"}:
            enum.append(None)  # Optional[Literal[...]]: null is one more allowed value
        else:
            enum = None
    return types, enum


def _schema_shape(node: object, defs: Mapping[str, Any], seen: frozenset[str]) -> _Shape:
    """Reduce one JSON-Schema node from pydantic to the guard's types/enum vocabulary."""
    if not isinstance(node, dict):
        return None, None
    ref = node.get("$ref")
    if isinstance(ref, str):
        target = ref.removeprefix("#/$defs/")
        if target in seen or target not in defs:
            return None, None
        return _schema_shape(defs[target], defs, seen | {target})
    all_of = node.get("allOf")
    if isinstance(all_of, list):
        # Only the single-element wrapper pydantic may emit is understood, not intersections.
        return _schema_shape(all_of[0], defs, seen) if len(all_of) == 1 else (None, None)
    branches = node.get("anyOf", node.get("oneOf"))
    if isinstance(branches, list):
        return _union_shapes([_schema_shape(b, defs, seen) for b in branches])

    values: list[Any] | None = None
    if "const" in node:
        values = [node["const"]]
    elif isinstance(node.get("enum"), list):
        values = list(node["enum"])
    raw_type = node.get("type")
    type_names = [raw_type] if isinstance(raw_type, str) else raw_type
    if isinstance(type_names, list):
        mapped = {"number" if t == "integer" else t for t in type_names}
        return (mapped if mapped <= JSON_TYPES else None), values
    if values is not None and all(_is_json_value(v) for v in values):
        return {_json_type_of(v) for v in values}, values
    return None, values


def _payload_from_model(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()  # by alias: payload keys are what clients send
    defs = schema.get("$defs", {})
    ref = schema.get("$ref")
    if isinstance(ref, str):  # recursive models put the root itself in $defs
        schema = defs.get(ref.removeprefix("#/$defs/"), schema)
    properties: dict[str, Any] = {}
    for key, node in schema.get("properties", {}).items():
        types, enum = _schema_shape(node, defs, frozenset())
        prop: dict[str, Any] = {}
        if types is not None:
            prop["types"] = sorted(types)
        if enum is not None:
            prop["enum"] = enum
        properties[key] = prop
    return {
        "required": list(schema.get("required", [])),
        "properties": properties,
        "additional": model.model_config.get("extra") != "forbid",
    }


class Guard:
    """A declarative precondition on a transition, checked by the database.

    ``payload`` is a pydantic model class (compiled from its JSON schema), a dict already in
    compiled form, or None. ``actor_kinds`` restricts which kinds of actor may fire the event.
    """

    __slots__ = ("_actor_kinds", "_compiled", "_payload_model")

    def __init__(
        self,
        payload: type[BaseModel] | Mapping[str, Any] | None = None,
        actor_kinds: Sequence[str] | None = None,
    ) -> None:
        self._payload_model: type[BaseModel] | None = None
        compiled: dict[str, Any] = {}
        if payload is not None:
            if isinstance(payload, type) and issubclass(payload, BaseModel):
                self._payload_model = payload
                where = f"guard.payload (from {payload.__name__})"
                compiled["payload"] = _normalize_payload(_payload_from_model(payload), where)
            elif isinstance(payload, Mapping):
                compiled["payload"] = _normalize_payload(dict(payload), "guard.payload")
            else:
                raise MachineDefinitionError(
                    "guard.payload: expected a pydantic model class or a dict, "
                    f"got {type(payload).__name__}"
                )
        self._actor_kinds: tuple[str, ...] | None = None
        if actor_kinds is not None:
            if isinstance(actor_kinds, str) or not isinstance(actor_kinds, Sequence):
                raise MachineDefinitionError("guard.actor_kinds: expected a list of strings")
            if not actor_kinds:
                raise MachineDefinitionError(
                    "guard.actor_kinds: must not be empty (omit it to allow any actor kind)"
                )
            for i, kind in enumerate(actor_kinds):
                if not isinstance(kind, str) or not kind:
                    raise MachineDefinitionError(
                        f"guard.actor_kinds[{i}]: expected a non-empty string, got {kind!r}"
                    )
            self._actor_kinds = tuple(sorted(set(actor_kinds)))
            compiled["actor_kinds"] = list(self._actor_kinds)
        if not compiled:
            raise MachineDefinitionError("a Guard needs a payload and/or actor_kinds")
        self._compiled = _canonical(compiled)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Guard:
        """Rebuild a guard from its compiled form (the inverse of :meth:`to_dict`)."""
        if not isinstance(data, Mapping):
            raise MachineDefinitionError(f"guard: expected a mapping, got {type(data).__name__}")
        _check_keys(data, ("payload", "actor_kinds"), "guard")
        return cls(payload=data.get("payload"), actor_kinds=data.get("actor_kinds"))

    def to_dict(self) -> dict[str, Any]:
        """The compiled guard (a fresh copy)."""
        result: dict[str, Any] = json.loads(self._compiled)
        return result

    @property
    def payload_model(self) -> type[BaseModel] | None:
        """The pydantic model the payload guard was compiled from, if any."""
        return self._payload_model

    @property
    def actor_kinds(self) -> tuple[str, ...] | None:
        return self._actor_kinds

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Guard) and other._compiled == self._compiled

    def __hash__(self) -> int:
        return hash(self._compiled)

    def __repr__(self) -> str:
        return f"Guard({self._compiled})"


# --------------------------------------------------------------------------------------------
# Declarations


class State:
    """A state of a machine; its name is the class attribute it is assigned to."""

    def __init__(
        self,
        *,
        initial: bool = False,
        final: bool = False,
        timeout: timedelta | None = None,
        on_timeout: str | None = None,
    ) -> None:
        # Values are checked when the machine class is created, so errors name the machine.
        self.initial = initial
        self.final = final
        self.timeout = timeout
        self.on_timeout = on_timeout
        self._name: str | None = None
        self._aliases: list[str] = []

    def __set_name__(self, owner: type, name: str) -> None:
        # Errors raised here would be wrapped in RuntimeError; record them, report them later.
        if self._name is None:
            self._name = name
        else:
            self._aliases.append(name)

    @property
    def name(self) -> str:
        if self._name is None:
            raise MachineDefinitionError("state is not assigned to a Machine class attribute")
        return self._name

    def to(
        self, target: State, *, requires_lease: bool = False, guard: Guard | None = None
    ) -> Transition:
        """An edge from this state to ``target``, named after the attribute it is assigned to."""
        if not isinstance(target, State):
            raise MachineDefinitionError(
                f"State.to() target must be a State, got {type(target).__name__} {target!r}"
            )
        return Transition(self, target, requires_lease=requires_lease, guard=guard)

    def __repr__(self) -> str:
        return f"State({self._name or '<unbound>'})"


class Transition:
    """One edge; its event name is the class attribute it (or its group) is assigned to."""

    def __init__(
        self, source: State, target: State, *, requires_lease: bool, guard: Guard | None
    ) -> None:
        self.source = source
        self.target = target
        self.requires_lease = requires_lease
        self.guard = guard
        self._event: str | None = None
        self._aliases: list[str] = []

    def __set_name__(self, owner: type, name: str) -> None:
        self._bind(name)

    def _bind(self, name: str) -> None:
        if self._event is None:
            self._event = name
        elif self._event != name:
            self._aliases.append(name)

    @property
    def event(self) -> str:
        if self._event is None:
            raise MachineDefinitionError("transition is not assigned to a Machine class attribute")
        return self._event

    def __or__(self, other: Transition | Transitions) -> Transitions:
        if isinstance(other, Transition):
            return Transitions((self, other))
        if isinstance(other, Transitions):
            return Transitions((self, *other))
        return NotImplemented

    def __repr__(self) -> str:
        source = self.source._name or "<unbound>"
        target = self.target._name or "<unbound>"
        return f"Transition({self._event or '<unbound>'}: {source} -> {target})"


class Transitions:
    """Several edges sharing one event name: ``close = a.to(z) | b.to(z)``."""

    def __init__(self, transitions: Sequence[Transition]) -> None:
        self._transitions = tuple(transitions)
        self._event: str | None = None

    def __set_name__(self, owner: type, name: str) -> None:
        self._event = name
        for transition in self._transitions:
            transition._bind(name)

    @property
    def event(self) -> str:
        if self._event is None:
            raise MachineDefinitionError("transitions are not assigned to a Machine attribute")
        return self._event

    @property
    def transitions(self) -> tuple[Transition, ...]:
        return self._transitions

    def __iter__(self) -> Iterator[Transition]:
        return iter(self._transitions)

    def __len__(self) -> int:
        return len(self._transitions)

    def __or__(self, other: Transition | Transitions) -> Transitions:
        if isinstance(other, Transition):
            return Transitions((*self._transitions, other))
        if isinstance(other, Transitions):
            return Transitions((*self._transitions, *other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"Transitions({list(self._transitions)!r})"


# --------------------------------------------------------------------------------------------
# Compiled form


@dataclass(frozen=True, slots=True)
class StateInfo:
    """A compiled state."""

    name: str
    initial: bool
    final: bool
    timeout: timedelta | None
    on_timeout: str | None

    @property
    def timeout_ms(self) -> int | None:
        return None if self.timeout is None else _timedelta_ms(self.timeout)


@dataclass(frozen=True, slots=True)
class Edge:
    """A compiled edge: ``event`` moves an instance from ``source`` to ``target``."""

    event: str
    source: str
    target: str
    requires_lease: bool
    guard: Guard | None


@dataclass(frozen=True, slots=True)
class _Compiled:
    states: Mapping[str, StateInfo]  # sorted by name
    edges: tuple[Edge, ...]  # sorted by (event, source)
    by_key: Mapping[tuple[str, str], Edge]  # (event, source) -> edge
    initial: str
    canonical_json: str
    def_hash: str


def _quoted(names: Sequence[str] | set[str]) -> str:
    return ", ".join(repr(n) for n in sorted(names))


def _collect(cls: type[Machine]) -> tuple[dict[str, State], list[tuple[str, Transition]]]:
    # Merged along the MRO so a subclass can extend (or override) its base machine's members.
    merged: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        merged.update(vars(klass))
    problems: list[str] = []
    states: dict[str, State] = {}
    transitions: list[tuple[str, Transition]] = []
    for attr, value in merged.items():
        if isinstance(value, State):
            names = {attr, value._name or attr, *value._aliases}
            if len(names) > 1:
                problems.append(
                    f"one State object is assigned to several names: {_quoted(names)} "
                    "(declare a separate State() for each)"
                )
            states[attr] = value
        elif isinstance(value, Transition):
            transitions.append((attr, value))
        elif isinstance(value, Transitions):
            transitions.extend((attr, t) for t in value)
    for event, transition in transitions:
        names = {event, transition._event or event, *transition._aliases}
        if len(names) > 1:
            problems.append(f"one transition object is used for several events: {_quoted(names)}")
    if problems:
        raise _error(cls, problems)
    return states, transitions


def _check_declarations(
    states: Mapping[str, State], transitions: Sequence[tuple[str, Transition]]
) -> list[str]:
    problems: list[str] = []
    all_names = {*states, *(event for event, _ in transitions)}
    reserved = all_names & _RESERVED
    if reserved:
        problems.append(
            f"names reserved by Machine cannot be states or events: {_quoted(reserved)}"
        )
    bad_names = {n for n in all_names if not NAME_RE.fullmatch(n)}
    if bad_names:
        problems.append(
            f"invalid state/event names: {_quoted(bad_names)} (names must match {NAME_RE.pattern})"
        )
    for sname, state in states.items():
        for flag in ("initial", "final"):
            if not isinstance(getattr(state, flag), bool):
                problems.append(f"state {sname!r}: {flag} must be a bool")
        if state.timeout is not None and not isinstance(state.timeout, timedelta):
            problems.append(
                f"state {sname!r}: timeout must be a datetime.timedelta, "
                f"got {type(state.timeout).__name__}"
            )
        if state.on_timeout is not None and not isinstance(state.on_timeout, str):
            problems.append(f"state {sname!r}: on_timeout must be an event name (str)")
    member_ids = {id(s) for s in states.values()}
    for event, transition in transitions:
        if not isinstance(transition.requires_lease, bool):
            problems.append(f"event {event!r}: requires_lease must be a bool")
        if transition.guard is not None and not isinstance(transition.guard, Guard):
            problems.append(f"event {event!r}: guard must be a Guard")
        for end in (transition.source, transition.target):
            if id(end) not in member_ids:
                problems.append(
                    f"event {event!r} uses state {end._name or '<unnamed>'!r}, "
                    "which is not a state of this machine"
                )
    return problems


def _check_timeouts(
    infos: Mapping[str, StateInfo], events: set[str], by_key: Mapping[tuple[str, str], Edge]
) -> list[str]:
    problems: list[str] = []
    for sname, state in infos.items():
        timeout, on_timeout = state.timeout, state.on_timeout
        if timeout is not None:
            if timeout <= timedelta(0):
                problems.append(f"state {sname!r}: timeout must be positive, got {timeout}")
            elif timeout > MAX_TIMEOUT:
                problems.append(
                    f"state {sname!r}: timeout must be at most {MAX_TIMEOUT.days} days, "
                    f"got {timeout}"
                )
            elif timeout % timedelta(milliseconds=1):
                problems.append(
                    f"state {sname!r}: timeout must be a whole number of milliseconds, "
                    f"got {timeout}"
                )
            if on_timeout is None:
                problems.append(
                    f"state {sname!r} has a timeout but no on_timeout event to fire when it expires"
                )
        if on_timeout is None:
            continue
        if timeout is None:
            problems.append(f"state {sname!r} has on_timeout={on_timeout!r} but no timeout")
        if on_timeout not in events:
            problems.append(f"state {sname!r}: on_timeout event {on_timeout!r} does not exist")
        elif (on_timeout, sname) not in by_key:
            problems.append(
                f"state {sname!r}: on_timeout event {on_timeout!r} has no transition from {sname!r}"
            )
        elif by_key[(on_timeout, sname)].guard is not None:
            # The sweeper fires it with no payload and a system actor: a guard could only
            # ever refuse it, leaving the instance stuck past its deadline.
            problems.append(f"state {sname!r}: timeout event {on_timeout!r} must not have a guard")
    return problems


def _compile(cls: type[Machine]) -> _Compiled:
    states, transitions = _collect(cls)
    if not states:
        raise _error(cls, ["declares no states"])
    problems = _check_declarations(states, transitions)
    if problems:
        raise _error(cls, problems)

    names = {id(s): n for n, s in states.items()}
    edges: list[Edge] = []
    by_key: dict[tuple[str, str], Edge] = {}
    for event, transition in transitions:
        edge = Edge(
            event=event,
            source=names[id(transition.source)],
            target=names[id(transition.target)],
            requires_lease=transition.requires_lease,
            guard=transition.guard,
        )
        if (event, edge.source) in by_key:
            problems.append(
                f"event {event!r} has more than one transition from state {edge.source!r}"
            )
        by_key[(event, edge.source)] = edge
        edges.append(edge)

    initials = [n for n, s in states.items() if s.initial]
    if not initials:
        problems.append("has no initial state (mark one with State(initial=True))")
    elif len(initials) > 1:
        problems.append(f"has several initial states: {_quoted(initials)}")
    for sname, state in states.items():
        if state.initial and state.final:
            problems.append(f"state {sname!r} cannot be both initial and final")
        out = sorted({e.event for e in edges if e.source == sname})
        if state.final and out:
            problems.append(f"final state {sname!r} has outgoing transitions: {_quoted(out)}")

    infos = {
        n: StateInfo(n, states[n].initial, states[n].final, states[n].timeout, states[n].on_timeout)
        for n in sorted(states)
    }
    problems += _check_timeouts(infos, {e.event for e in edges}, by_key)
    if len(initials) == 1:
        reached = set(_reachable(initials[0], edges))
        unreachable = [n for n in states if n not in reached]
        if unreachable:
            problems.append(
                f"states not reachable from initial state {initials[0]!r}: {_quoted(unreachable)}"
            )
    if problems:
        raise _error(cls, problems)

    sorted_edges = tuple(sorted(edges, key=lambda e: (e.event, e.source)))
    canonical = _canonical(_definition_dict(cls.name, initials[0], infos, sorted_edges))
    try:
        utf8 = canonical.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (e.g. "\ud800" in a guard's actor kind) is not Unicode: the
        # database could not store the definition, nor the hash name it.
        problem = "a name or guard value contains a lone surrogate, which is not Unicode"
        raise _error(cls, [problem]) from None
    return _Compiled(
        states=MappingProxyType(infos),
        edges=sorted_edges,
        by_key=MappingProxyType(by_key),
        initial=initials[0],
        canonical_json=canonical,
        def_hash=hashlib.sha256(utf8).hexdigest(),
    )


def _edge_order(edge: Edge) -> tuple[str, str]:
    return (edge.event, edge.target)


def _reachable(initial: str, edges: Sequence[Edge]) -> list[str]:
    """States reachable from ``initial``, breadth first over edges sorted by (event, target)."""
    order = [initial]
    seen = {initial}
    for current in order:  # the list grows while iterating: it is the BFS queue
        for edge in sorted((e for e in edges if e.source == current), key=_edge_order):
            if edge.target not in seen:
                seen.add(edge.target)
                order.append(edge.target)
    return order


def _error(cls: type[Machine], problems: list[str]) -> MachineDefinitionError:
    problems = list(dict.fromkeys(problems))  # the same object can be reported twice
    label = f"machine {cls.name!r}"
    if len(problems) == 1:
        return MachineDefinitionError(f"{label}: {problems[0]}", problems)
    lines = "\n".join(f"  - {p}" for p in problems)
    return MachineDefinitionError(f"{label} has {len(problems)} problems:\n{lines}", problems)


def _definition_dict(
    name: str, initial: str, states: Mapping[str, StateInfo], edges: Sequence[Edge]
) -> dict[str, Any]:
    return {
        "name": name,
        "initial": initial,
        "states": {
            s.name: {"final": s.final, "timeout_ms": s.timeout_ms, "on_timeout": s.on_timeout}
            for s in states.values()
        },
        "edges": [
            {
                "event": e.event,
                "from": e.source,
                "to": e.target,
                "requires_lease": e.requires_lease,
                "guard": None if e.guard is None else e.guard.to_dict(),
            }
            for e in edges
        ],
    }


# --------------------------------------------------------------------------------------------
# Machine


class Machine:
    """Base class for state machines; subclasses are validated when they are created.

    ``name`` (a class attribute) defaults to the class name and is not inherited."""

    name: ClassVar[str]
    _compiled: ClassVar[_Compiled | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__  # a subclass is a different machine
        elif not isinstance(cls.__dict__["name"], str):
            raise MachineDefinitionError(
                f"machine {cls.__name__!r}: 'name' is reserved for the machine name "
                f"and must be a string, got {type(cls.__dict__['name']).__name__}"
            )
        if not MACHINE_NAME_RE.fullmatch(cls.name):
            raise MachineDefinitionError(
                f"machine {cls.name!r}: invalid machine name "
                f"(must match {MACHINE_NAME_RE.pattern}; set name = '...' on the class)"
            )
        cls._compiled = _compile(cls)

    @classmethod
    def _c(cls) -> _Compiled:
        if cls._compiled is None:
            raise TypeError("Machine is a base class; declare a subclass with states")
        return cls._compiled

    @classmethod
    def definition(cls) -> dict[str, Any]:
        """The canonical definition dict (a fresh copy)."""
        result: dict[str, Any] = json.loads(cls._c().canonical_json)
        return result

    @classmethod
    def canonical_json(cls) -> str:
        """Sorted-key, compact JSON of :meth:`definition`; the input of :meth:`def_hash`."""
        return cls._c().canonical_json

    @classmethod
    def def_hash(cls) -> str:
        """SHA-256 hex digest of :meth:`canonical_json` (UTF-8)."""
        return cls._c().def_hash

    @classmethod
    def states(cls) -> Mapping[str, StateInfo]:
        """States by name, sorted by name."""
        return cls._c().states

    @classmethod
    def events(cls) -> tuple[str, ...]:
        """Distinct event names, sorted."""
        return tuple(sorted({e.event for e in cls._c().edges}))

    @classmethod
    def edges(cls) -> tuple[Edge, ...]:
        """All edges, sorted by (event, source)."""
        return cls._c().edges

    @classmethod
    def edge(cls, event: str, from_state: str) -> Edge | None:
        """The edge for ``event`` out of ``from_state``, or None if the event is illegal there."""
        return cls._c().by_key.get((event, from_state))

    @classmethod
    def initial_state(cls) -> str:
        return cls._c().initial

    @classmethod
    def final_states(cls) -> set[str]:
        return {s.name for s in cls._c().states.values() if s.final}

    @classmethod
    def from_registered(cls, definition: Mapping[str, Any]) -> type[Machine]:
        """Rebuild a machine from a canonical definition dict (see :meth:`definition`)."""
        return machine_from_definition(definition)

    @classmethod
    def _diagram(cls) -> tuple[list[str], list[tuple[Edge, str, bool]]]:
        """States in BFS order, and (edge, label, fired-by-timeout) rows in the same order."""
        compiled = cls._c()
        timeouts = {
            (s.on_timeout, s.name): format_duration(s.timeout_ms)
            for s in compiled.states.values()
            if s.on_timeout is not None and s.timeout_ms is not None
        }
        order = _reachable(compiled.initial, compiled.edges)
        rows: list[tuple[Edge, str, bool]] = []
        for state in order:
            for edge in sorted((e for e in compiled.edges if e.source == state), key=_edge_order):
                label = edge.event + (" [lease]" if edge.requires_lease else "")
                after = timeouts.get((edge.event, edge.source))
                if after is not None:
                    label += f" (after {after})"
                rows.append((edge, label, after is not None))
        return order, rows

    @classmethod
    def to_mermaid(cls) -> str:
        """A Mermaid ``stateDiagram-v2`` of the machine (deterministic)."""
        order, rows = cls._diagram()
        states = cls._c().states
        lines = ["stateDiagram-v2", f"    [*] --> {cls._c().initial}"]
        lines += [f"    {e.source} --> {e.target}: {label}" for e, label, _ in rows]
        lines += [f"    {s} --> [*]" for s in order if states[s].final]
        return "\n".join(lines) + "\n"

    @classmethod
    def to_dot(cls) -> str:
        """A Graphviz digraph: final states are double circles, timeout edges are dashed."""
        order, rows = cls._diagram()
        states = cls._c().states
        title = cls.name.replace("\\", "\\\\").replace('"', '\\"')
        lines = [
            f'digraph "{title}" {{',
            "    rankdir=LR;",
            "    node [shape=box, style=rounded];",
            '    "__start__" [shape=point, label=""];',
        ]
        lines += [
            f'    "{s}" [shape=doublecircle];' if states[s].final else f'    "{s}";' for s in order
        ]
        lines.append(f'    "__start__" -> "{cls._c().initial}";')
        for edge, label, by_timeout in rows:
            style = ", style=dashed" if by_timeout else ""
            lines.append(f'    "{edge.source}" -> "{edge.target}" [label="{label}"{style}];')
        lines.append("}")
        return "\n".join(lines) + "\n"


# Public Machine attributes would be shadowed by a state or event of the same name.
_RESERVED: frozenset[str] = frozenset(n for n in dir(Machine) if not n.startswith("_"))


# --------------------------------------------------------------------------------------------
# Loading from data


@dataclass(frozen=True, slots=True)
class _StateDecl:
    name: str
    initial: bool
    final: bool
    timeout: timedelta | None
    on_timeout: str | None


@dataclass(frozen=True, slots=True)
class _EdgeDecl:
    event: str
    source: str
    target: str
    requires_lease: bool
    guard: Guard | None


def _build(name: str, states: Sequence[_StateDecl], edges: Sequence[_EdgeDecl]) -> type[Machine]:
    """Create a Machine subclass from declarations, so the class-creation checks apply."""
    names = {*(s.name for s in states), *(e.event for e in edges)}
    # Checked before type(): such names could clobber namespace entries like __module__.
    bad = {n for n in names if not NAME_RE.fullmatch(n)}
    if bad:
        raise MachineDefinitionError(
            f"machine {name!r}: invalid state/event names: {_quoted(bad)} "
            f"(names must match {NAME_RE.pattern})"
        )
    objects = {
        s.name: State(initial=s.initial, final=s.final, timeout=s.timeout, on_timeout=s.on_timeout)
        for s in states
    }
    # One class namespace holds both, so a name cannot be a state and an event.
    both = set(objects) & {e.event for e in edges}
    if both:
        raise MachineDefinitionError(
            f"machine {name!r}: names used for both a state and an event: {_quoted(both)}"
        )
    grouped: dict[str, list[Transition]] = {}
    for e in edges:
        transition = objects[e.source].to(
            objects[e.target], requires_lease=e.requires_lease, guard=e.guard
        )
        grouped.setdefault(e.event, []).append(transition)
    namespace: dict[str, Any] = {"name": name, "__module__": __name__, "__qualname__": name}
    namespace.update(objects)
    for event, group in grouped.items():
        namespace[event] = group[0] if len(group) == 1 else Transitions(group)
    machine = type(name, (Machine,), namespace)
    assert issubclass(machine, Machine)
    return machine


def _doc_error(path: str, problem: str) -> MachineDefinitionError:
    return MachineDefinitionError(f"invalid machine document at {path}: {problem}")


def _expect_str(value: object, path: str) -> str:
    if not isinstance(value, str):
        hint = (
            " (quote it: YAML reads yes/no/on/off as booleans)" if isinstance(value, bool) else ""
        )
        raise _doc_error(path, f"expected a string, got {value!r}{hint}")
    return value


def _expect_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _doc_error(path, f"expected true or false, got {value!r}")
    return value


def _expect_mapping(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _doc_error(path, f"expected a mapping, got {type(value).__name__}")
    for key in value:
        _expect_str(key, f"{path} (key {key!r})")
    return value


def _expect_keys(data: Mapping[str, Any], path: str, allowed: Sequence[str]) -> None:
    for key in data:
        if key not in allowed:
            raise _doc_error(
                f"{path}.{key}" if path else key,
                f"unknown key (expected one of: {', '.join(sorted(allowed))})",
            )


def _expect_required(data: Mapping[str, Any], path: str, keys: Sequence[str]) -> None:
    for key in keys:
        if key not in data:
            raise _doc_error(f"{path}.{key}" if path else key, "required")


def _doc_guard(value: object, path: str) -> Guard | None:
    if value is None:
        return None
    data = _expect_mapping(value, path)
    _expect_keys(data, path, ("actor_kinds", "payload"))
    try:
        return Guard(payload=data.get("payload"), actor_kinds=data.get("actor_kinds"))
    except MachineDefinitionError as exc:
        raise _doc_error(path, str(exc)) from exc


def _doc_optional_str(value: object, path: str) -> str | None:
    return None if value is None else _expect_str(value, path)


def machine_from_dict(data: Mapping[str, Any]) -> type[Machine]:
    """Build a machine from a hand-written document (see the module docs for the format)."""
    doc = _expect_mapping(data, "<document>")
    _expect_keys(doc, "", ("name", "states", "transitions"))
    _expect_required(doc, "", ("name", "states"))
    name = _expect_str(doc["name"], "name")

    states_doc = _expect_mapping(doc["states"], "states")
    states: list[_StateDecl] = []
    for sname, raw in states_doc.items():
        path = f"states.{sname}"
        spec = _expect_mapping({} if raw is None else raw, path)
        _expect_keys(spec, path, ("final", "initial", "on_timeout", "timeout"))
        timeout: timedelta | None = None
        if spec.get("timeout") is not None:
            try:
                timeout = parse_duration(spec["timeout"])
            except MachineDefinitionError as exc:
                raise _doc_error(f"{path}.timeout", str(exc)) from exc
        states.append(
            _StateDecl(
                name=sname,
                initial=_expect_bool(spec.get("initial", False), f"{path}.initial"),
                final=_expect_bool(spec.get("final", False), f"{path}.final"),
                timeout=timeout,
                on_timeout=_doc_optional_str(spec.get("on_timeout"), f"{path}.on_timeout"),
            )
        )

    transitions_doc = doc.get("transitions", [])
    if not isinstance(transitions_doc, list):
        raise _doc_error("transitions", f"expected a list, got {type(transitions_doc).__name__}")
    edges: list[_EdgeDecl] = []
    for i, raw in enumerate(transitions_doc):
        path = f"transitions[{i}]"
        spec = _expect_mapping(raw, path)
        _expect_keys(spec, path, ("event", "from", "guard", "requires_lease", "to"))
        _expect_required(spec, path, ("event", "from", "to"))
        event = _expect_str(spec["event"], f"{path}.event")
        if isinstance(spec["from"], list):
            if not spec["from"]:
                raise _doc_error(f"{path}.from", "expected at least one state")
            sources = [_expect_str(s, f"{path}.from[{j}]") for j, s in enumerate(spec["from"])]
        else:
            sources = [_expect_str(spec["from"], f"{path}.from")]
        target = _expect_str(spec["to"], f"{path}.to")
        for where, sname in [*((f"{path}.from", s) for s in sources), (f"{path}.to", target)]:
            if sname not in states_doc:
                raise _doc_error(where, f"unknown state {sname!r}")
        lease = _expect_bool(spec.get("requires_lease", False), f"{path}.requires_lease")
        guard = _doc_guard(spec.get("guard"), f"{path}.guard")
        edges.extend(_EdgeDecl(event, source, target, lease, guard) for source in sources)
    return _build(name, states, edges)


def machine_from_definition(definition: Mapping[str, Any]) -> type[Machine]:
    """Rebuild a machine from its canonical definition (the inverse of ``definition()``)."""
    doc = _expect_mapping(definition, "<definition>")
    _expect_keys(doc, "", ("edges", "initial", "name", "states"))
    _expect_required(doc, "", ("name", "initial", "states", "edges"))
    name = _expect_str(doc["name"], "name")
    initial = _expect_str(doc["initial"], "initial")
    states_doc = _expect_mapping(doc["states"], "states")
    if initial not in states_doc:
        raise _doc_error("initial", f"unknown state {initial!r}")
    states: list[_StateDecl] = []
    for sname, raw in states_doc.items():
        path = f"states.{sname}"
        spec = _expect_mapping(raw, path)
        _expect_keys(spec, path, ("final", "on_timeout", "timeout_ms"))
        _expect_required(spec, path, ("final", "on_timeout", "timeout_ms"))
        timeout_ms = spec["timeout_ms"]
        if timeout_ms is not None and (
            isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int)
        ):
            raise _doc_error(
                f"{path}.timeout_ms", f"expected an integer or null, got {timeout_ms!r}"
            )
        states.append(
            _StateDecl(
                name=sname,
                initial=sname == initial,
                final=_expect_bool(spec["final"], f"{path}.final"),
                timeout=None
                if timeout_ms is None
                else _milliseconds(timeout_ms, f"{path}.timeout_ms"),
                on_timeout=_doc_optional_str(spec["on_timeout"], f"{path}.on_timeout"),
            )
        )
    if not isinstance(doc["edges"], list):
        raise _doc_error("edges", f"expected a list, got {type(doc['edges']).__name__}")
    edges: list[_EdgeDecl] = []
    for i, raw in enumerate(doc["edges"]):
        path = f"edges[{i}]"
        spec = _expect_mapping(raw, path)
        _expect_keys(spec, path, ("event", "from", "guard", "requires_lease", "to"))
        _expect_required(spec, path, ("event", "from", "guard", "requires_lease", "to"))
        source = _expect_str(spec["from"], f"{path}.from")
        target = _expect_str(spec["to"], f"{path}.to")
        for where, sname in ((f"{path}.from", source), (f"{path}.to", target)):
            if sname not in states_doc:
                raise _doc_error(where, f"unknown state {sname!r}")
        edges.append(
            _EdgeDecl(
                event=_expect_str(spec["event"], f"{path}.event"),
                source=source,
                target=target,
                requires_lease=_expect_bool(spec["requires_lease"], f"{path}.requires_lease"),
                guard=_doc_guard(spec["guard"], f"{path}.guard"),
            )
        )
    return _build(name, states, edges)


class _DuplicateKey(Exception):
    """A mapping names one key twice: the loaders would keep the last silently."""


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"key {key!r} appears twice ({key_node.start_mark})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"key {key!r} appears twice")
        result[key] = value
    return result


def machine_from_yaml(text: str) -> type[Machine]:
    """Build a machine from a YAML document (see :func:`machine_from_dict`)."""
    try:
        data = yaml.load(text, Loader=_StrictYamlLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise MachineDefinitionError(f"invalid YAML: {exc}") from exc
    except _DuplicateKey as exc:
        raise MachineDefinitionError(f"invalid YAML: {exc}") from None
    return machine_from_dict(data)


def machine_from_json(text: str) -> type[Machine]:
    """Build a machine from a JSON document (see :func:`machine_from_dict`)."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise MachineDefinitionError(f"invalid JSON: {exc}") from exc
    except _DuplicateKey as exc:
        raise MachineDefinitionError(f"invalid JSON: {exc}") from None
    return machine_from_dict(data)


def load_machine(path: str | os.PathLike[str]) -> type[Machine]:
    """Load a machine document from a ``.yaml``/``.yml`` or ``.json`` file."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in (".yaml", ".yml"):
        parse = machine_from_yaml
    elif suffix == ".json":
        parse = machine_from_json
    else:
        raise MachineDefinitionError(
            f"{file}: unsupported file type {suffix!r} (expected .yaml, .yml or .json)"
        )
    text = file.read_text(encoding="utf-8")
    try:
        return parse(text)
    except MachineDefinitionError as exc:
        raise MachineDefinitionError(f"{file}: {exc}", exc.problems) from exc
