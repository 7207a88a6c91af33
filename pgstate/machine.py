"""State machines declared in Python (or loaded from YAML/JSON), validated when declared,
and compiled to canonical JSON whose sha256 is the definition's identity in the database."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import BaseModel

NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MACHINE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,99}$")
JSON_TYPES = ("string", "number", "boolean", "object", "array", "null")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class MachineDefinitionError(ValueError):
    """A machine definition that cannot be enforced; raised when it is declared."""


class Guard:
    """A declarative guard, checked in the database: the payload's shape (from a pydantic
    model or the compiled form) and the actor kinds allowed to fire the edge."""

    def __init__(
        self,
        payload: type[BaseModel] | Mapping[str, Any] | None = None,
        actor_kinds: Iterable[str] | None = None,
    ) -> None:
        self.payload = payload
        self.actor_kinds = list(actor_kinds) if actor_kinds is not None else None

    def compile(self, where: str) -> dict[str, Any]:
        compiled: dict[str, Any] = {}
        if self.actor_kinds is not None:
            if not self.actor_kinds or not all(isinstance(k, str) and k for k in self.actor_kinds):
                raise MachineDefinitionError(f"{where}: actor_kinds must be non-empty strings")
            compiled["actor_kinds"] = sorted(set(self.actor_kinds))
        if self.payload is not None:
            if isinstance(self.payload, type) and issubclass(self.payload, BaseModel):
                compiled["payload"] = payload_from_model(self.payload)
            elif isinstance(self.payload, Mapping):
                compiled["payload"] = check_payload_spec(dict(self.payload), where)
            else:
                raise MachineDefinitionError(
                    f"{where}: guard payload must be a pydantic model or a dict"
                )
        return compiled


def _schema_types(schema: Mapping[str, Any]) -> set[str] | None:
    """The JSON types a JSON-Schema fragment admits, in jsonb_typeof's words; None = any."""
    if "anyOf" in schema:
        union: set[str] = set()
        for option in schema["anyOf"]:
            types = _schema_types(option)
            if types is None:
                return None
            union |= types
        return union
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return {_json_type(value) for value in values}
    kind = schema.get("type")
    if kind is None:
        return None
    kinds = kind if isinstance(kind, list) else [kind]
    return {"number" if k == "integer" else k for k in kinds if isinstance(k, str)}


def _json_type(value: object) -> str:
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


def payload_from_model(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    properties: dict[str, Any] = {}
    for key, spec in schema.get("properties", {}).items():
        prop: dict[str, Any] = {}
        types = _schema_types(spec)
        if types is not None:
            prop["types"] = sorted(types)
        if "enum" in spec:
            prop["enum"] = list(spec["enum"])
        elif "const" in spec:
            prop["enum"] = [spec["const"]]
        properties[key] = prop
    compiled: dict[str, Any] = {
        "required": sorted(schema.get("required", [])),
        "properties": properties,
    }
    if model.model_config.get("extra") == "forbid":
        compiled["additional"] = False
    return compiled


def check_payload_spec(spec: dict[str, Any], where: str) -> dict[str, Any]:
    allowed = {"required", "properties", "additional"}
    unknown = set(spec) - allowed
    if unknown:
        raise MachineDefinitionError(f"{where}: unknown payload keys {sorted(unknown)}")
    required = spec.get("required", [])
    if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
        raise MachineDefinitionError(f"{where}.required: must be a list of strings")
    properties = spec.get("properties", {})
    if not isinstance(properties, dict):
        raise MachineDefinitionError(f"{where}.properties: must be a mapping")
    for key, prop in properties.items():
        if not isinstance(prop, dict) or set(prop) - {"types", "enum"}:
            raise MachineDefinitionError(f"{where}.properties.{key}: only 'types' and 'enum'")
        types = prop.get("types")
        if types is not None and (not isinstance(types, list) or not set(types) <= set(JSON_TYPES)):
            raise MachineDefinitionError(
                f"{where}.properties.{key}.types: must be a list of {', '.join(JSON_TYPES)}"
            )
        if "enum" in prop and not isinstance(prop["enum"], list):
            raise MachineDefinitionError(f"{where}.properties.{key}.enum: must be a list")
    if "additional" in spec and not isinstance(spec["additional"], bool):
        raise MachineDefinitionError(f"{where}.additional: must be true or false")
    compiled: dict[str, Any] = {"required": sorted(required), "properties": properties}
    if spec.get("additional") is False:
        compiled["additional"] = False
    return compiled


class State:
    """A state. Its name is the attribute it is assigned to in the Machine class."""

    def __init__(
        self,
        *,
        initial: bool = False,
        final: bool = False,
        timeout: timedelta | None = None,
        on_timeout: str | None = None,
    ) -> None:
        self.initial = initial
        self.final = final
        self.timeout = timeout
        self.on_timeout = on_timeout
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def to(
        self, target: State, *, requires_lease: bool = False, guard: Guard | None = None
    ) -> Transitions:
        if not isinstance(target, State):
            raise MachineDefinitionError("State.to takes a State")
        return Transitions([Transition(self, target, requires_lease, guard)])

    def __repr__(self) -> str:
        return f"State({self.name!r})"


class Transition:
    def __init__(
        self, source: State, target: State, requires_lease: bool, guard: Guard | None
    ) -> None:
        self.source = source
        self.target = target
        self.requires_lease = requires_lease
        self.guard = guard


class Transitions:
    """One event's edges; ``a.to(b) | c.to(b)`` lets one event leave several states."""

    def __init__(self, edges: list[Transition]) -> None:
        self.edges = edges
        self.event = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.event = name

    def __or__(self, other: Transitions) -> Transitions:
        return Transitions(self.edges + other.edges)


def _ms(timeout: timedelta) -> int:
    return int(timeout / timedelta(milliseconds=1))


class Machine:
    """Base class of declared machines; subclasses are validated when the class is made."""

    name: ClassVar[str] = ""
    _definition: ClassVar[dict[str, Any]]
    _canonical: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__
        cls._definition = _compile(cls)
        cls._canonical = json.dumps(
            cls._definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )

    @classmethod
    def definition(cls) -> dict[str, Any]:
        return json.loads(cls._canonical)  # type: ignore[no-any-return]

    @classmethod
    def canonical_json(cls) -> str:
        return cls._canonical

    @classmethod
    def def_hash(cls) -> str:
        return hashlib.sha256(cls._canonical.encode("utf-8")).hexdigest()

    @classmethod
    def states(cls) -> list[str]:
        return sorted(cls._definition["states"])

    @classmethod
    def events(cls) -> list[str]:
        return sorted({edge["event"] for edge in cls._definition["edges"]})

    @classmethod
    def initial_state(cls) -> str:
        return str(cls._definition["initial"])

    @classmethod
    def final_states(cls) -> set[str]:
        return {name for name, s in cls._definition["states"].items() if s["final"]}

    @classmethod
    def edge(cls, event: str, from_state: str) -> dict[str, Any] | None:
        for edge in cls._definition["edges"]:
            if edge["event"] == event and edge["from"] == from_state:
                return dict(edge)
        return None

    @classmethod
    def to_mermaid(cls) -> str:
        definition = cls._definition
        lines = ["stateDiagram-v2", f"    [*] --> {definition['initial']}"]
        for edge in definition["edges"]:
            lines.append(f"    {edge['from']} --> {edge['to']}: {_edge_label(definition, edge)}")
        for state in sorted(cls.final_states()):
            lines.append(f"    {state} --> [*]")
        return "\n".join(lines) + "\n"

    @classmethod
    def to_dot(cls) -> str:
        definition = cls._definition
        lines = [
            f'digraph "{cls.name}" {{',
            "    rankdir=LR;",
            '    __start [shape=point, label=""];',
        ]
        for state, spec in sorted(definition["states"].items()):
            shape = "doublecircle" if spec["final"] else "circle"
            lines.append(f'    "{state}" [shape={shape}];')
        lines.append(f'    __start -> "{definition["initial"]}";')
        for edge in definition["edges"]:
            label = _edge_label(definition, edge)
            lines.append(f'    "{edge["from"]}" -> "{edge["to"]}" [label="{label}"];')
        return "\n".join(lines) + "\n}\n"


def _edge_label(definition: Mapping[str, Any], edge: Mapping[str, Any]) -> str:
    label = str(edge["event"])
    source = definition["states"][edge["from"]]
    if source["on_timeout"] == edge["event"] and source["timeout_ms"] is not None:
        label += f" (after {_human(source['timeout_ms'])})"
    if edge["requires_lease"]:
        label += " [lease]"
    return label


def _human(milliseconds: int) -> str:
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if milliseconds % size == 0:
            return f"{milliseconds // size}{unit}"
    return f"{milliseconds}ms"


def _compile(cls: type[Machine]) -> dict[str, Any]:
    machine = cls.name
    if not MACHINE_NAME.match(machine):
        raise MachineDefinitionError(f"machine name {machine!r} must match {MACHINE_NAME.pattern}")
    states: dict[str, State] = {}
    groups: list[Transitions] = []
    for klass in reversed(cls.__mro__):
        for attribute, value in vars(klass).items():
            if isinstance(value, State):
                states[attribute] = value
            elif isinstance(value, Transitions):
                groups.append(value)
    where = f"machine {machine}"
    if not states:
        raise MachineDefinitionError(f"{where} declares no states")
    for state_name in states:
        if not NAME.match(state_name):
            raise MachineDefinitionError(
                f"{where}: state name {state_name!r} must match {NAME.pattern}"
            )
    initial = [n for n, s in states.items() if s.initial]
    if not initial:
        raise MachineDefinitionError(f"{where} has no initial state")
    if len(initial) > 1:
        raise MachineDefinitionError(f"{where} has several initial states: {', '.join(initial)}")
    edges: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for group in groups:
        event = group.event
        if not NAME.match(event):
            raise MachineDefinitionError(f"{where}: event name {event!r} must match {NAME.pattern}")
        for edge in group.edges:
            for end in (edge.source, edge.target):
                if end.name not in states or states[end.name] is not end:
                    raise MachineDefinitionError(
                        f"{where}: event {event} uses a state that is not part of the machine"
                    )
            source, target = edge.source.name, edge.target.name
            if edge.source.final:
                raise MachineDefinitionError(
                    f"{where}: final state {source} has an outgoing edge ({event})"
                )
            if (event, source) in seen:
                raise MachineDefinitionError(
                    f"{where}: event {event} is declared twice from state {source}"
                )
            seen.add((event, source))
            guard = edge.guard.compile(f"{where}: guard of {event}") if edge.guard else None
            edges.append(
                {
                    "event": event,
                    "from": source,
                    "to": target,
                    "requires_lease": bool(edge.requires_lease),
                    "guard": guard or None,
                }
            )
    edges.sort(key=lambda e: (e["event"], e["from"]))
    for state_name, state in states.items():
        if state.timeout is not None:
            if state.timeout <= timedelta(0):
                raise MachineDefinitionError(f"{where}: timeout of {state_name} must be positive")
            if state.on_timeout is None:
                raise MachineDefinitionError(
                    f"{where}: state {state_name} has a timeout but no on_timeout"
                )
            if (state.on_timeout, state_name) not in seen:
                raise MachineDefinitionError(
                    f"{where}: on_timeout of {state_name} names {state.on_timeout!r}, "
                    f"which is no edge out of {state_name}"
                )
        elif state.on_timeout is not None:
            raise MachineDefinitionError(
                f"{where}: state {state_name} has on_timeout but no timeout"
            )
    reachable = {initial[0]}
    frontier = [initial[0]]
    while frontier:
        current = frontier.pop()
        for edge_spec in edges:
            if edge_spec["from"] == current and edge_spec["to"] not in reachable:
                reachable.add(edge_spec["to"])
                frontier.append(edge_spec["to"])
    unreachable = sorted(set(states) - reachable)
    if unreachable:
        raise MachineDefinitionError(f"{where}: unreachable states: {', '.join(unreachable)}")
    return {
        "name": machine,
        "initial": initial[0],
        "states": {
            n: {
                "final": s.final,
                "timeout_ms": _ms(s.timeout) if s.timeout is not None else None,
                "on_timeout": s.on_timeout,
            }
            for n, s in sorted(states.items())
        },
        "edges": edges,
    }


def parse_duration(value: object, where: str) -> timedelta:
    if isinstance(value, bool):
        raise MachineDefinitionError(f"{where}: a duration like 300s, 5m, 1h or 250ms")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    raise MachineDefinitionError(f"{where}: a duration like 300s, 5m, 1h or 250ms, got {value!r}")


def _expect(value: object, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MachineDefinitionError(f"{where}: wrong type {type(value).__name__}")
    return value


def machine_from_dict(document: Mapping[str, Any]) -> type[Machine]:
    """Build a Machine class from a data document (the YAML/JSON format)."""
    _expect(document, Mapping, "document")
    unknown = set(document) - {"name", "states", "transitions"}
    if unknown:
        raise MachineDefinitionError(f"document: unknown keys {sorted(unknown)}")
    name = _expect(document.get("name"), str, "name")
    attributes: dict[str, Any] = {"name": name}
    states = _expect(document.get("states"), Mapping, "states")
    state_objects: dict[str, State] = {}
    for state_name, spec in states.items():
        where = f"states.{state_name}"
        spec = {} if spec is None else _expect(spec, Mapping, where)
        extra = set(spec) - {"initial", "final", "timeout", "on_timeout"}
        if extra:
            raise MachineDefinitionError(f"{where}: unknown keys {sorted(extra)}")
        timeout = spec.get("timeout")
        state = State(
            initial=bool(_expect(spec.get("initial", False), bool, f"{where}.initial")),
            final=bool(_expect(spec.get("final", False), bool, f"{where}.final")),
            timeout=parse_duration(timeout, f"{where}.timeout") if timeout is not None else None,
            on_timeout=spec.get("on_timeout"),
        )
        state_objects[str(state_name)] = state
        attributes[str(state_name)] = state
    events: dict[str, Transitions] = {}
    for index, item in enumerate(_expect(document.get("transitions", []), list, "transitions")):
        where = f"transitions[{index}]"
        item = _expect(item, Mapping, where)
        extra = set(item) - {"event", "from", "to", "requires_lease", "guard"}
        if extra:
            raise MachineDefinitionError(f"{where}: unknown keys {sorted(extra)}")
        event = _expect(item.get("event"), str, f"{where}.event")
        sources = item.get("from")
        sources = [sources] if isinstance(sources, str) else _expect(sources, list, f"{where}.from")
        target = state_objects.get(_expect(item.get("to"), str, f"{where}.to"))
        if target is None:
            raise MachineDefinitionError(f"{where}.to: unknown state {item.get('to')!r}")
        guard_spec = item.get("guard")
        guard = None
        if guard_spec is not None:
            guard_spec = _expect(guard_spec, Mapping, f"{where}.guard")
            extra = set(guard_spec) - {"payload", "actor_kinds"}
            if extra:
                raise MachineDefinitionError(f"{where}.guard: unknown keys {sorted(extra)}")
            guard = Guard(
                payload=guard_spec.get("payload"), actor_kinds=guard_spec.get("actor_kinds")
            )
        for source_name in sources:
            source = state_objects.get(source_name)
            if source is None:
                raise MachineDefinitionError(f"{where}.from: unknown state {source_name!r}")
            edge = source.to(
                target,
                requires_lease=bool(
                    _expect(item.get("requires_lease", False), bool, f"{where}.requires_lease")
                ),
                guard=guard,
            )
            events[event] = events[event] | edge if event in events else edge
    if set(events) & set(attributes):
        raise MachineDefinitionError(
            f"names used both as state and event: {sorted(set(events) & set(attributes))}"
        )
    attributes.update(events)
    return type(name.replace("-", "_").replace(".", "_"), (Machine,), attributes)


def machine_from_definition(definition: Mapping[str, Any]) -> type[Machine]:
    """Rebuild a Machine from its canonical definition (as stored in pgstate.machines)."""
    states = {
        name: {
            "initial": name == definition["initial"],
            "final": spec["final"],
            **({"timeout": spec["timeout_ms"] / 1000} if spec["timeout_ms"] is not None else {}),
            **({"on_timeout": spec["on_timeout"]} if spec["on_timeout"] is not None else {}),
        }
        for name, spec in definition["states"].items()
    }
    transitions = [
        {
            "event": e["event"],
            "from": e["from"],
            "to": e["to"],
            "requires_lease": e["requires_lease"],
            **({"guard": e["guard"]} if e["guard"] else {}),
        }
        for e in definition["edges"]
    ]
    return machine_from_dict(
        {"name": definition["name"], "states": states, "transitions": transitions}
    )


def machine_from_yaml(text: str) -> type[Machine]:
    return machine_from_dict(yaml.safe_load(text))


def machine_from_json(text: str) -> type[Machine]:
    return machine_from_dict(json.loads(text))


def load_machine(path: str | Path) -> type[Machine]:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        return machine_from_yaml(text)
    if path.suffix == ".json":
        return machine_from_json(text)
    raise MachineDefinitionError(f"{path}: a machine file ends in .yaml, .yml or .json")
