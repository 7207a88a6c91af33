"""OpenTelemetry: a span per transition with its outcome, and the traceparent stored."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pgstate import IllegalTransition, NewEvent, Store
from pgstate.triage import Ticket

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(tracer_provider)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    yield EXPORTER


def test_transition_span_and_traceparent(store: Store, exporter: InMemorySpanExporter) -> None:
    store.register(Ticket)
    stream = f"ticket-{uuid.uuid4().hex[:8]}"
    store.create(stream, Ticket)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("agent step") as parent:
        lease = store.acquire_lease(stream, "a1", ttl=timedelta(seconds=5))
        store.transition(stream, "start_classifying", lease_epoch=lease.epoch)
    [span] = [s for s in exporter.get_finished_spans() if s.name == "pgstate.transition"]
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    attributes = dict(span.attributes or {})
    assert attributes["pgstate.event"] == "start_classifying"
    assert attributes["pgstate.from_state"] == "new"
    assert attributes["pgstate.to_state"] == "classifying"
    assert attributes["pgstate.outcome"] == "applied"
    assert isinstance(attributes["pgstate.lock_wait_us"], int)
    stored = store.read_stream(stream)[-1]
    context = span.get_span_context()
    assert context is not None
    flags = int(context.trace_flags)
    assert stored.traceparent == f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"


def test_rejected_transition_span(store: Store, exporter: InMemorySpanExporter) -> None:
    store.register(Ticket)
    stream = f"ticket-{uuid.uuid4().hex[:8]}"
    store.create(stream, Ticket)
    with pytest.raises(IllegalTransition):
        store.transition(stream, "resolve")
    [span] = [s for s in exporter.get_finished_spans() if s.name == "pgstate.transition"]
    attributes = dict(span.attributes or {})
    assert attributes["pgstate.outcome"] == "rejected"
    assert attributes["pgstate.sqlstate"] == "SM002"
    assert attributes["pgstate.current_state"] == "new"
    assert span.status.status_code == trace.StatusCode.ERROR


def test_append_span_and_traceparent(store: Store, exporter: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test")
    stream = f"note-{uuid.uuid4().hex[:8]}"
    with tracer.start_as_current_span("agent step"):
        store.append(stream, [NewEvent(type="Noted"), NewEvent(type="Noted")])
    [span] = [s for s in exporter.get_finished_spans() if s.name == "pgstate.append"]
    attributes = dict(span.attributes or {})
    assert attributes["pgstate.events"] == 2
    assert attributes["pgstate.outcome"] == "applied"
    assert attributes["pgstate.version"] == 2
    context = span.get_span_context()
    assert context is not None
    flags = int(context.trace_flags)
    expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
    assert {e.traceparent for e in store.read_stream(stream)} == {expected}
