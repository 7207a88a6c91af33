"""Unit tests for pgstate.machine: declaration, validation, compilation, loading, diagrams."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from pgstate.machine import (
    Edge,
    Guard,
    Machine,
    MachineDefinitionError,
    State,
    StateInfo,
    Transition,
    Transitions,
    format_duration,
    load_machine,
    machine_from_definition,
    machine_from_dict,
    machine_from_json,
    machine_from_yaml,
    parse_duration,
)


class Classification(BaseModel):
    label: str
    confidence: float | None = None


class Ticket(Machine):
    new = State(initial=True)
    classifying = State(timeout=timedelta(minutes=5), on_timeout="give_up")
    classified = State()
    resolved = State(final=True)

    start_classifying = new.to(classifying, requires_lease=True)
    classify = classifying.to(
        classified,
        requires_lease=True,
        guard=Guard(payload=Classification, actor_kinds=["classifier"]),
    )
    give_up = classifying.to(new)
    resolve = classified.to(resolved)
    close = new.to(resolved) | classified.to(resolved)


TICKET_YAML = """
name: Ticket
states:
  new: {initial: true}
  classifying: {timeout: 300s, on_timeout: give_up}
  classified:
  resolved: {final: true}
transitions:
  - {event: start_classifying, from: new, to: classifying, requires_lease: true}
  - event: classify
    from: classifying
    to: classified
    requires_lease: true
    guard:
      actor_kinds: [classifier]
      payload:
        required: [label]
        properties:
          label: {types: [string]}
          confidence: {types: [number, "null"]}
  - {event: give_up, from: classifying, to: new}
  - {event: resolve, from: classified, to: resolved}
  - {event: close, from: [new, classified], to: resolved}
"""


class Small(Machine):
    idle = State(initial=True)
    busy = State(timeout=timedelta(seconds=90), on_timeout="expire")
    done = State(final=True)

    start = idle.to(busy, requires_lease=True)
    finish = busy.to(done)
    expire = busy.to(idle)


def error_of(excinfo: pytest.ExceptionInfo[MachineDefinitionError]) -> str:
    return str(excinfo.value)


# --------------------------------------------------------------------------------------------
# Declaration and introspection


def test_names_come_from_attributes() -> None:
    assert Ticket.name == "Ticket"
    assert Ticket.new.name == "new"
    assert isinstance(Ticket.classify, Transition)
    assert Ticket.classify.event == "classify"
    assert isinstance(Ticket.close, Transitions)
    assert Ticket.close.event == "close"
    assert [t.event for t in Ticket.close] == ["close", "close"]
    assert len(Ticket.close) == 2


def test_introspection_helpers() -> None:
    assert list(Ticket.states()) == ["classified", "classifying", "new", "resolved"]
    assert Ticket.states()["classifying"] == StateInfo(
        "classifying", False, False, timedelta(minutes=5), "give_up"
    )
    assert Ticket.states()["classifying"].timeout_ms == 300_000
    assert Ticket.events() == ("classify", "close", "give_up", "resolve", "start_classifying")
    assert Ticket.initial_state() == "new"
    assert Ticket.final_states() == {"resolved"}
    assert [(e.event, e.source) for e in Ticket.edges()] == [
        ("classify", "classifying"),
        ("close", "classified"),
        ("close", "new"),
        ("give_up", "classifying"),
        ("resolve", "classified"),
        ("start_classifying", "new"),
    ]
    assert Ticket.edge("start_classifying", "new") == Edge(
        "start_classifying", "new", "classifying", True, None
    )
    assert Ticket.edge("resolve", "new") is None
    assert Ticket.edge("nope", "new") is None
    classify = Ticket.edge("classify", "classifying")
    assert classify is not None and classify.guard is not None
    assert classify.guard.payload_model is Classification
    assert classify.guard.actor_kinds == ("classifier",)


def test_explicit_machine_name() -> None:
    class Named(Machine):
        name = "billing.Invoice-v2"
        open = State(initial=True)
        paid = State(final=True)
        pay = open.to(paid)

    assert Named.name == "billing.Invoice-v2"
    assert Named.definition()["name"] == "billing.Invoice-v2"


def test_subclass_extends_and_gets_its_own_name() -> None:
    class Extended(Small):
        cancelled = State(final=True)
        cancel = Small.idle.to(cancelled)

    assert Extended.name == "Extended"
    assert "cancelled" in Extended.states() and "busy" in Extended.states()
    assert Extended.edge("cancel", "idle") is not None
    assert Extended.def_hash() != Small.def_hash()


def test_base_machine_has_no_definition() -> None:
    with pytest.raises(TypeError, match="base class"):
        Machine.definition()


def test_definition_is_a_fresh_copy() -> None:
    first = Ticket.definition()
    first["states"].clear()
    first["edges"][0]["guard"]["actor_kinds"].append("x")
    assert Ticket.definition()["states"]
    assert Ticket.definition()["edges"][0]["guard"]["actor_kinds"] == ["classifier"]


# --------------------------------------------------------------------------------------------
# Canonical definition and hash


SMALL_CANONICAL = (
    '{"edges":['
    '{"event":"expire","from":"busy","guard":null,"requires_lease":false,"to":"idle"},'
    '{"event":"finish","from":"busy","guard":null,"requires_lease":false,"to":"done"},'
    '{"event":"start","from":"idle","guard":null,"requires_lease":true,"to":"busy"}],'
    '"initial":"idle","name":"Small","states":{'
    '"busy":{"final":false,"on_timeout":"expire","timeout_ms":90000},'
    '"done":{"final":true,"on_timeout":null,"timeout_ms":null},'
    '"idle":{"final":false,"on_timeout":null,"timeout_ms":null}}}'
)


def test_canonical_json_golden() -> None:
    assert Small.canonical_json() == SMALL_CANONICAL
    assert Small.def_hash() == hashlib.sha256(SMALL_CANONICAL.encode("utf-8")).hexdigest()
    assert Small.definition() == json.loads(SMALL_CANONICAL)


def test_definition_shape() -> None:
    definition = Ticket.definition()
    assert set(definition) == {"name", "initial", "states", "edges"}
    assert definition["states"]["classifying"] == {
        "final": False,
        "timeout_ms": 300_000,
        "on_timeout": "give_up",
    }
    assert definition["edges"][0] == {
        "event": "classify",
        "from": "classifying",
        "to": "classified",
        "requires_lease": True,
        "guard": {
            "actor_kinds": ["classifier"],
            "payload": {
                "required": ["label"],
                "properties": {
                    "confidence": {"types": ["null", "number"]},
                    "label": {"types": ["string"]},
                },
                "additional": True,
            },
        },
    }
    assert [(e["event"], e["from"]) for e in definition["edges"]] == sorted(
        (e["event"], e["from"]) for e in definition["edges"]
    )


def _small(timeout: timedelta) -> type[Machine]:
    class Small(Machine):
        idle = State(initial=True)
        busy = State(timeout=timeout, on_timeout="expire")
        done = State(final=True)

        start = idle.to(busy, requires_lease=True)
        finish = busy.to(done)
        expire = busy.to(idle)

    return Small


def test_hash_is_stable_and_sensitive() -> None:
    assert _small(timedelta(seconds=90)).def_hash() == Small.def_hash()
    assert _small(timedelta(seconds=90)).def_hash() == _small(timedelta(seconds=90)).def_hash()
    assert _small(timedelta(seconds=91)).def_hash() != Small.def_hash()


def test_hash_ignores_declaration_order() -> None:
    class Reordered(Machine):
        name = "Small"
        done = State(final=True)
        busy = State(on_timeout="expire", timeout=timedelta(minutes=1.5))
        idle = State(initial=True)

        expire = busy.to(idle)
        finish = busy.to(done)
        start = idle.to(busy, requires_lease=True)

    assert Reordered.def_hash() == Small.def_hash()


def test_hash_ignores_guard_list_order() -> None:
    def build(kinds: list[str], enum: list[str]) -> type[Machine]:
        payload = {"properties": {"x": {"enum": enum}}}
        return machine_from_dict(
            {
                "name": "G",
                "states": {"a": {"initial": True}, "b": {"final": True}},
                "transitions": [
                    {
                        "event": "go",
                        "from": "a",
                        "to": "b",
                        "guard": {"actor_kinds": kinds, "payload": payload},
                    }
                ],
            }
        )

    assert build(["x", "y"], ["p", "q"]).def_hash() == build(["y", "x", "y"], ["q", "p"]).def_hash()


# --------------------------------------------------------------------------------------------
# Validation rules


def test_rejects_edge_out_of_final_state() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            new = State(initial=True)
            resolved = State(final=True)
            resolve = new.to(resolved)
            reopen = resolved.to(new)

    assert (
        error_of(excinfo)
        == "machine 'Bad': final state 'resolved' has outgoing transitions: 'reopen'"
    )


def test_rejects_no_initial_state() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class NoStart(Machine):
            a = State()
            b = State(final=True)
            go = a.to(b)

    assert "machine 'NoStart'" in error_of(excinfo)
    assert "has no initial state" in error_of(excinfo)


def test_rejects_several_initial_states() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class TwoStarts(Machine):
            a = State(initial=True)
            b = State(initial=True)
            c = State(final=True)
            go = a.to(c) | b.to(c)

    assert error_of(excinfo) == "machine 'TwoStarts': has several initial states: 'a', 'b'"


def test_rejects_unreachable_states() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Island(Machine):
            a = State(initial=True)
            b = State(final=True)
            c = State()
            d = State()
            go = a.to(b)
            loop = c.to(d)

    assert error_of(excinfo) == (
        "machine 'Island': states not reachable from initial state 'a': 'c', 'd'"
    )


def test_rejects_timeout_without_on_timeout() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True, timeout=timedelta(seconds=5))
            b = State(final=True)
            go = a.to(b)

    assert "state 'a' has a timeout but no on_timeout event" in error_of(excinfo)


def test_rejects_on_timeout_naming_unknown_event() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True, timeout=timedelta(seconds=5), on_timeout="nope")
            b = State(final=True)
            go = a.to(b)

    assert error_of(excinfo) == "machine 'Bad': state 'a': on_timeout event 'nope' does not exist"


def test_rejects_on_timeout_event_without_edge_from_that_state() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True, timeout=timedelta(seconds=5), on_timeout="back")
            b = State()
            c = State(final=True)
            go = a.to(b)
            back = b.to(a)
            end = b.to(c)

    assert "state 'a': on_timeout event 'back' has no transition from 'a'" in error_of(excinfo)


def test_rejects_on_timeout_without_timeout() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True, on_timeout="go")
            b = State(final=True)
            go = a.to(b)

    assert error_of(excinfo) == "machine 'Bad': state 'a' has on_timeout='go' but no timeout"


@pytest.mark.parametrize("timeout", [timedelta(0), timedelta(seconds=-5)])
def test_rejects_non_positive_timeout(timeout: timedelta) -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True, timeout=timeout, on_timeout="go")
            b = State(final=True)
            go = a.to(b)

    assert "state 'a': timeout must be positive" in error_of(excinfo)


def test_rejects_sub_millisecond_timeout() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True, timeout=timedelta(microseconds=1500), on_timeout="go")
            b = State(final=True)
            go = a.to(b)

    assert "timeout must be a whole number of milliseconds" in error_of(excinfo)


def test_rejects_timeout_of_wrong_type() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True, timeout=30, on_timeout="go")  # type: ignore[arg-type]
            b = State(final=True)
            go = a.to(b)

    assert "state 'a': timeout must be a datetime.timedelta, got int" in error_of(excinfo)


def test_rejects_non_bool_flags() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=1)  # type: ignore[arg-type]
            b = State(final=True)
            go = a.to(b, requires_lease="yes")  # type: ignore[arg-type]

    assert "state 'a': initial must be a bool" in error_of(excinfo)
    assert "event 'go': requires_lease must be a bool" in error_of(excinfo)


def test_rejects_duplicate_event_from_same_state() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True)
            b = State(final=True)
            c = State(final=True)
            go = a.to(b) | a.to(c)

    assert error_of(excinfo) == (
        "machine 'Bad': event 'go' has more than one transition from state 'a'"
    )


def test_rejects_machine_without_states() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Empty(Machine):
            pass

    assert error_of(excinfo) == "machine 'Empty': declares no states"


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("Upper = State(initial=True)\n    b = State(final=True)\n    go = Upper.to(b)", "Upper"),
        ("a = State(initial=True)\n    b = State(final=True)\n    Go = a.to(b)", "Go"),
        ("a = State(initial=True)\n    b = State(final=True)\n    _go = a.to(b)", "_go"),
        (
            "a = State(initial=True)\n    b = State(final=True)\n    go2x = a.to(b)\n"
            f"    {'x' * 64} = a.to(b)",
            "x" * 64,
        ),
    ],
)
def test_rejects_invalid_names(source: str, bad: str) -> None:
    code = f"class Bad(Machine):\n    {source}\n"
    with pytest.raises(MachineDefinitionError) as excinfo:
        exec(code, {"Machine": Machine, "State": State})
    assert f"invalid state/event names: {bad!r}" in error_of(excinfo)
    assert "^[a-z][a-z0-9_]{0,62}$" in error_of(excinfo)


def test_rejects_names_reserved_by_machine() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True)
            b = State(final=True)
            states = a.to(b)  # type: ignore[assignment]

    assert "names reserved by Machine cannot be states or events: 'states'" in error_of(excinfo)


def test_rejects_state_named_name() -> None:
    with pytest.raises(MachineDefinitionError, match="'name' is reserved for the machine name"):

        class Bad(Machine):
            name = State(initial=True)  # type: ignore[assignment]


def test_rejects_invalid_machine_name() -> None:
    with pytest.raises(MachineDefinitionError, match="invalid machine name"):

        class Bad(Machine):
            name = "has spaces"
            a = State(initial=True)


def test_rejects_initial_final_state() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True, final=True)

    assert "state 'a' cannot be both initial and final" in error_of(excinfo)


def test_rejects_state_object_reused_under_two_names() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True)
            b = a
            c = State(final=True)
            go = a.to(c)

    assert "one State object is assigned to several names: 'a', 'b'" in error_of(excinfo)


def test_rejects_transition_object_reused_under_two_events() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True)
            c = State(final=True)
            go = a.to(c)
            also = go

    assert "one transition object is used for several events: 'also', 'go'" in error_of(excinfo)


def test_rejects_states_of_another_machine() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True)
            go = a.to(Small.done)

    assert "event 'go' uses state 'done', which is not a state of this machine" in error_of(excinfo)


def test_rejects_unassigned_target_state() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True)
            go = a.to(State(final=True))

    assert "uses state '<unnamed>', which is not a state of this machine" in error_of(excinfo)


def test_to_accepts_only_states() -> None:
    with pytest.raises(MachineDefinitionError, match="target must be a State, got str"):
        State().to("resolved")  # type: ignore[arg-type]


def test_guard_must_be_a_guard() -> None:
    with pytest.raises(MachineDefinitionError, match="event 'go': guard must be a Guard"):

        class Bad(Machine):
            a = State(initial=True)
            b = State(final=True)
            go = a.to(b, guard={"actor_kinds": ["x"]})  # type: ignore[arg-type]


def test_reports_all_problems_at_once() -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:

        class Bad(Machine):
            a = State(initial=True, timeout=timedelta(seconds=1))
            b = State(final=True)
            c = State()
            go = a.to(b)
            back = b.to(a)

    problems = excinfo.value.problems
    assert error_of(excinfo).startswith("machine 'Bad' has 3 problems:\n  - ")
    assert any("final state 'b' has outgoing transitions: 'back'" in p for p in problems)
    assert any("state 'a' has a timeout but no on_timeout" in p for p in problems)
    assert any("not reachable from initial state 'a': 'c'" in p for p in problems)


def test_unbound_declarations_raise_on_name_access() -> None:
    with pytest.raises(MachineDefinitionError, match="not assigned"):
        _ = State().name
    with pytest.raises(MachineDefinitionError, match="not assigned"):
        _ = State().to(State()).event
    with pytest.raises(MachineDefinitionError, match="not assigned"):
        _ = (State().to(State()) | State().to(State())).event


def test_transition_groups_combine() -> None:
    a, b, c = State(), State(), State()
    group = a.to(b) | b.to(c) | (c.to(a) | a.to(c))
    assert isinstance(group, Transitions)
    assert [(t.source, t.target) for t in group] == [(a, b), (b, c), (c, a), (a, c)]


# --------------------------------------------------------------------------------------------
# Guards


class Color(StrEnum):
    red = "red"
    blue = "blue"


class Inner(BaseModel):
    x: int


class Rich(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    count: int
    ratio: float = 1.0
    maybe: int | None = None
    choice: Literal["x", "y"]
    maybe_choice: Literal["z"] | None = None
    mixed: Literal[1, "a"]
    color: Color
    maybe_color: Color | None = None
    inner: Inner
    items: list[int] = []
    mapping: dict[str, int] = {}
    flag: bool | str
    anything: Any = None
    aliased: int = Field(alias="aliasedKey")


def test_guard_from_pydantic_model() -> None:
    compiled = Guard(payload=Rich).to_dict()
    assert compiled == {
        "payload": {
            "required": sorted(
                ["text", "count", "choice", "mixed", "color", "inner", "flag", "aliasedKey"]
            ),
            "properties": {
                "text": {"types": ["string"]},
                "count": {"types": ["number"]},
                "ratio": {"types": ["number"]},
                "maybe": {"types": ["null", "number"]},
                "choice": {"types": ["string"], "enum": ["x", "y"]},
                "maybe_choice": {"types": ["null", "string"], "enum": ["z", None]},
                "mixed": {"types": ["number", "string"], "enum": ["a", 1]},
                "color": {"types": ["string"], "enum": ["blue", "red"]},
                "maybe_color": {"types": ["null", "string"], "enum": ["blue", "red", None]},
                "inner": {"types": ["object"]},
                "items": {"types": ["array"]},
                "mapping": {"types": ["object"]},
                "flag": {"types": ["boolean", "string"]},
                "anything": {},
                "aliasedKey": {"types": ["number"]},
            },
            "additional": False,
        }
    }


def test_guard_model_without_forbid_allows_additional_keys() -> None:
    compiled = Guard(payload=Classification, actor_kinds=["b", "a", "b"]).to_dict()
    assert compiled == {
        "actor_kinds": ["a", "b"],
        "payload": {
            "required": ["label"],
            "properties": {
                "label": {"types": ["string"]},
                "confidence": {"types": ["null", "number"]},
            },
            "additional": True,
        },
    }


def test_guard_from_dict_is_normalized() -> None:
    guard = Guard(payload={"properties": {"n": {"types": ["number", "null", "number"]}}})
    assert guard.to_dict() == {
        "payload": {
            "required": [],
            "properties": {"n": {"types": ["null", "number"]}},
            "additional": True,
        }
    }
    assert guard.payload_model is None
    assert guard.actor_kinds is None


def test_guard_equality_and_round_trip() -> None:
    guard = Guard(payload=Classification, actor_kinds=["classifier"])
    again = Guard.from_dict(guard.to_dict())
    assert again == guard
    assert hash(again) == hash(guard)
    assert again != Guard(actor_kinds=["classifier"])
    assert "classifier" in repr(guard)


@pytest.mark.parametrize(
    ("payload", "actor_kinds", "message"),
    [
        (None, None, "a Guard needs a payload and/or actor_kinds"),
        (None, [], "guard.actor_kinds: must not be empty"),
        (None, "classifier", "guard.actor_kinds: expected a list of strings"),
        (None, ["ok", ""], "guard.actor_kinds[1]: expected a non-empty string"),
        (42, None, "guard.payload: expected a pydantic model class or a dict, got int"),
        ({"requird": []}, None, "guard.payload: unknown key 'requird'"),
        ({"required": "label"}, None, "guard.payload.required: expected a list of keys"),
        ({"required": [1]}, None, "guard.payload.required[0]: expected a non-empty string"),
        ({"additional": "no"}, None, "guard.payload.additional: expected true or false"),
        ({"properties": []}, None, "guard.payload.properties: expected a mapping"),
        (
            {"properties": {"a": {"types": ["str"]}}},
            None,
            "guard.payload.properties.a.types[0]: unknown type 'str'",
        ),
        (
            {"properties": {"a": {"types": []}}},
            None,
            "guard.payload.properties.a.types: expected a non-empty list",
        ),
        (
            {"properties": {"a": {"enum": "x"}}},
            None,
            "guard.payload.properties.a.enum: expected a non-empty list",
        ),
        (
            {"properties": {"a": {"types": ["string"], "enum": ["x", 1]}}},
            None,
            "guard.payload.properties.a.enum: values [1] do not match types ['string']",
        ),
        (
            {"properties": {"a": {"minLength": 1}}},
            None,
            "guard.payload.properties.a: unknown key 'minLength'",
        ),
        (
            {"properties": {"a": {"enum": [float("nan")]}}},
            None,
            "guard.payload.properties.a.enum[0]: nan is not a JSON value",
        ),
        (
            {"required": ["b"], "properties": {"a": {}}, "additional": False},
            None,
            "required keys ['b'] are not in properties, but additional is false",
        ),
    ],
)
def test_guard_rejects_bad_shapes(payload: Any, actor_kinds: Any, message: str) -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:
        Guard(payload=payload, actor_kinds=actor_kinds)
    assert message in error_of(excinfo)


def test_guard_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(MachineDefinitionError, match="guard: unknown key 'actors'"):
        Guard.from_dict({"actors": ["x"]})


# --------------------------------------------------------------------------------------------
# Loading from data


def test_yaml_json_and_python_hashes_match() -> None:
    from_yaml = machine_from_yaml(TICKET_YAML)
    assert from_yaml.canonical_json() == Ticket.canonical_json()
    assert from_yaml.def_hash() == Ticket.def_hash()
    import yaml

    as_json = json.dumps(yaml.safe_load(TICKET_YAML))
    assert machine_from_json(as_json).def_hash() == Ticket.def_hash()
    assert issubclass(from_yaml, Machine)
    assert from_yaml.name == "Ticket"
    assert isinstance(vars(from_yaml)["close"], Transitions)


def test_yaml_with_pydantic_equivalent_guard() -> None:
    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")
        label: Literal["billing", "bug"]

    class Py(Machine):
        name = "Strict"
        a = State(initial=True)
        b = State(final=True)
        go = a.to(b, guard=Guard(payload=Strict))

    doc = """
name: Strict
states: {a: {initial: true}, b: {final: true}}
transitions:
  - event: go
    from: a
    to: b
    guard:
      payload:
        required: [label]
        additional: false
        properties: {label: {types: [string], enum: [bug, billing]}}
"""
    assert machine_from_yaml(doc).def_hash() == Py.def_hash()


def test_load_machine_by_suffix(tmp_path: Path) -> None:
    for suffix in (".yaml", ".yml"):
        path = tmp_path / f"ticket{suffix}"
        path.write_text(TICKET_YAML, encoding="utf-8")
        assert load_machine(path).def_hash() == Ticket.def_hash()
    json_path = tmp_path / "ticket.JSON"
    import yaml

    json_path.write_text(json.dumps(yaml.safe_load(TICKET_YAML)), encoding="utf-8")
    assert load_machine(str(json_path)).def_hash() == Ticket.def_hash()


def test_load_machine_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: X\nstates: {a: {initial: true, colour: red}}\n", encoding="utf-8")
    with pytest.raises(MachineDefinitionError) as excinfo:
        load_machine(bad)
    assert error_of(excinfo).startswith(f"{bad}: invalid machine document at states.a.colour")
    with pytest.raises(MachineDefinitionError, match=r"unsupported file type '\.txt'"):
        load_machine(tmp_path / "machine.txt")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "at <document>: expected a mapping, got list"),
        ({"states": {}}, "at name: required"),
        ({"name": "X"}, "at states: required"),
        ({"name": "X", "states": {}, "extra": 1}, "at extra: unknown key"),
        ({"name": 3, "states": {}}, "at name: expected a string, got 3"),
        ({"name": "X", "states": []}, "at states: expected a mapping, got list"),
        ({"name": "X", "states": {"a": 1}}, "at states.a: expected a mapping, got int"),
        (
            {"name": "X", "states": {"a": {"intial": True}}},
            "at states.a.intial: unknown key (expected one of: final, initial, on_timeout, "
            "timeout)",
        ),
        ({"name": "X", "states": {"a": {"initial": "yes"}}}, "at states.a.initial: expected true"),
        (
            {"name": "X", "states": {"a": {"timeout": "soon", "on_timeout": "go"}}},
            "at states.a.timeout: cannot parse duration 'soon'",
        ),
        (
            {"name": "X", "states": {"a": {"on_timeout": 5}}},
            "at states.a.on_timeout: expected a string, got 5",
        ),
        (
            {"name": "X", "states": {False: {}}},
            "at states (key False): expected a string, got False (quote it",
        ),
        ({"name": "X", "states": {}, "transitions": {}}, "at transitions: expected a list"),
        (
            {"name": "X", "states": {"a": {}}, "transitions": [{"event": "go", "to": "a"}]},
            "at transitions[0].from: required",
        ),
        (
            {
                "name": "X",
                "states": {"a": {}},
                "transitions": [{"event": "go", "from": "a", "to": "z"}],
            },
            "at transitions[0].to: unknown state 'z'",
        ),
        (
            {
                "name": "X",
                "states": {"a": {}},
                "transitions": [{"event": "go", "from": ["a", "q"], "to": "a"}],
            },
            "at transitions[0].from: unknown state 'q'",
        ),
        (
            {
                "name": "X",
                "states": {"a": {}},
                "transitions": [{"event": "go", "from": [], "to": "a"}],
            },
            "at transitions[0].from: expected at least one state",
        ),
        (
            {
                "name": "X",
                "states": {"a": {}},
                "transitions": [{"event": "go", "from": "a", "to": "a", "lease": True}],
            },
            "at transitions[0].lease: unknown key",
        ),
        (
            {
                "name": "X",
                "states": {"a": {}},
                "transitions": [{"event": "go", "from": "a", "to": "a", "requires_lease": 1}],
            },
            "at transitions[0].requires_lease: expected true or false, got 1",
        ),
        (
            {
                "name": "X",
                "states": {"a": {}},
                "transitions": [{"event": "go", "from": "a", "to": "a", "guard": {"who": []}}],
            },
            "at transitions[0].guard.who: unknown key",
        ),
        (
            {
                "name": "X",
                "states": {"a": {}},
                "transitions": [
                    {
                        "event": "go",
                        "from": "a",
                        "to": "a",
                        "guard": {"payload": {"properties": {"l": {"types": ["text"]}}}},
                    }
                ],
            },
            "at transitions[0].guard: guard.payload.properties.l.types[0]: unknown type 'text'",
        ),
        (
            {
                "name": "X",
                "states": {"go": {"initial": True}},
                "transitions": [{"event": "go", "from": "go", "to": "go"}],
            },
            "names used for both a state and an event: 'go'",
        ),
        (
            {"name": "X", "states": {"__module__": {"initial": True}}},
            "invalid state/event names: '__module__'",
        ),
    ],
)
def test_bad_documents_name_the_bad_field(document: Any, message: str) -> None:
    with pytest.raises(MachineDefinitionError) as excinfo:
        machine_from_dict(document)
    assert message in error_of(excinfo)


def test_documents_run_machine_validation() -> None:
    doc = {
        "name": "Loop",
        "states": {"a": {"initial": True}, "b": {"final": True}},
        "transitions": [
            {"event": "go", "from": "a", "to": "b"},
            {"event": "back", "from": "b", "to": "a"},
        ],
    }
    with pytest.raises(MachineDefinitionError) as excinfo:
        machine_from_dict(doc)
    assert error_of(excinfo) == "machine 'Loop': final state 'b' has outgoing transitions: 'back'"


def test_duplicate_edges_in_document_are_rejected() -> None:
    doc = {
        "name": "Dup",
        "states": {"a": {"initial": True}, "b": {"final": True}},
        "transitions": [
            {"event": "go", "from": "a", "to": "b"},
            {"event": "go", "from": ["a"], "to": "b"},
        ],
    }
    with pytest.raises(MachineDefinitionError, match="event 'go' has more than one transition"):
        machine_from_dict(doc)


def test_invalid_yaml_and_json() -> None:
    with pytest.raises(MachineDefinitionError, match="invalid YAML"):
        machine_from_yaml("name: [unclosed")
    with pytest.raises(MachineDefinitionError, match="invalid JSON"):
        machine_from_json("{")
    with pytest.raises(MachineDefinitionError, match="expected a mapping, got str"):
        machine_from_yaml("just text")


# --------------------------------------------------------------------------------------------
# Round trip through the canonical definition


def test_definition_round_trip() -> None:
    for machine in (Ticket, Small):
        rebuilt = Machine.from_registered(machine.definition())
        assert rebuilt.definition() == machine.definition()
        assert rebuilt.def_hash() == machine.def_hash()
        assert machine_from_definition(json.loads(machine.canonical_json())).def_hash() == (
            machine.def_hash()
        )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("edges"), "at edges: required"),
        (lambda d: d.update(version=2), "at version: unknown key"),
        (lambda d: d.update(initial="nowhere"), "at initial: unknown state 'nowhere'"),
        (lambda d: d["states"]["busy"].pop("final"), "at states.busy.final: required"),
        (
            lambda d: d["states"]["busy"].update(timeout_ms="90s"),
            "at states.busy.timeout_ms: expected an integer or null",
        ),
        (lambda d: d["edges"][0].update(to="gone"), "at edges[0].to: unknown state 'gone'"),
        (lambda d: d["edges"][0].pop("guard"), "at edges[0].guard: required"),
        (lambda d: d["states"]["busy"].update(timeout_ms=0), "timeout must be positive"),
    ],
)
def test_from_registered_rejects_bad_definitions(mutate: Any, message: str) -> None:
    definition = Small.definition()
    mutate(definition)
    with pytest.raises(MachineDefinitionError) as excinfo:
        machine_from_definition(definition)
    assert message in error_of(excinfo)


# --------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300s", timedelta(seconds=300)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("250ms", timedelta(milliseconds=250)),
        ("1h30m", timedelta(minutes=90)),
        ("1h 30m 5s", timedelta(hours=1, minutes=30, seconds=5)),
        ("2d", timedelta(days=2)),
        ("1.5s", timedelta(milliseconds=1500)),
        ("0.1s", timedelta(milliseconds=100)),
        (300, timedelta(seconds=300)),
        (0.25, timedelta(milliseconds=250)),
    ],
)
def test_parse_duration(text: str | int | float, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["", "5", "5 minutes", "-5s", "1.5.5s", "0.0001s", True, None])
def test_parse_duration_rejects(bad: Any) -> None:
    with pytest.raises(MachineDefinitionError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("ms", "text"),
    [(300_000, "5m"), (90_000, "1m30s"), (250, "250ms"), (3_600_000, "1h"), (129_600_000, "1d12h")],
)
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration(ms) == text
    assert parse_duration(text) == timedelta(milliseconds=ms)


# --------------------------------------------------------------------------------------------
# Diagrams


def test_mermaid_golden() -> None:
    assert Small.to_mermaid() == (
        "stateDiagram-v2\n"
        "    [*] --> idle\n"
        "    idle --> busy: start [lease]\n"
        "    busy --> idle: expire (after 1m30s)\n"
        "    busy --> done: finish\n"
        "    done --> [*]\n"
    )


def test_dot_golden() -> None:
    assert Small.to_dot() == (
        'digraph "Small" {\n'
        "    rankdir=LR;\n"
        "    node [shape=box, style=rounded];\n"
        '    "__start__" [shape=point, label=""];\n'
        '    "idle";\n'
        '    "busy";\n'
        '    "done" [shape=doublecircle];\n'
        '    "__start__" -> "idle";\n'
        '    "idle" -> "busy" [label="start [lease]"];\n'
        '    "busy" -> "idle" [label="expire (after 1m30s)", style=dashed];\n'
        '    "busy" -> "done" [label="finish"];\n'
        "}\n"
    )


def test_diagrams_do_not_depend_on_declaration_order() -> None:
    loaded = machine_from_yaml(TICKET_YAML)
    assert loaded.to_mermaid() == Ticket.to_mermaid()
    assert loaded.to_dot() == Ticket.to_dot()


def test_timeout_edge_may_not_have_a_guard() -> None:
    with pytest.raises(MachineDefinitionError, match="must not have a guard"):

        class Guarded(Machine):
            waiting = State(initial=True, timeout=timedelta(seconds=5), on_timeout="expire")
            expired = State(final=True)
            expire = waiting.to(expired, guard=Guard(actor_kinds=["worker"]))


def test_a_key_given_twice_in_a_document_is_refused() -> None:
    from pgstate.machine import machine_from_json, machine_from_yaml

    document = """
name: Twice
initial: working
states:
  working: {timeout: 5m, on_timeout: give_up}
  working: {}
  gone: {final: true}
transitions:
  give_up: {from: working, to: gone}
"""
    with pytest.raises(MachineDefinitionError, match="'working' appears twice"):
        machine_from_yaml(document)
    with pytest.raises(MachineDefinitionError, match="'name' appears twice"):
        machine_from_json('{"name": "Ticket", "name": "Other"}')


@pytest.mark.parametrize(
    "guard",
    [{"actor_kinds": ["\ud800"]}, {"payload": {"properties": {"a": {"enum": ["\udfff"]}}}}],
    ids=["actor-kind", "enum-value"],
)
def test_a_lone_surrogate_in_a_guard_is_a_definition_error(guard: dict[str, Any]) -> None:
    document = {
        "name": "Surrogates",
        "states": {"open": {"initial": True}, "shut": {"final": True}},
        "transitions": [{"event": "close", "from": "open", "to": "shut", "guard": guard}],
    }
    with pytest.raises(MachineDefinitionError, match="lone surrogate"):
        machine_from_dict(document)
    with pytest.raises(MachineDefinitionError, match="lone surrogate"):
        machine_from_json(json.dumps(document))
