"""OpenTelemetry's API installed but no SDK configured (no tracer provider set): pgstate
starts no span, and still stores the traceparent of a context propagated to it.

Runs in a fresh interpreter: the other telemetry tests install a provider for the whole
process, and the API allows that only once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from pgstate._connect import libpq_dsn

SCRIPT = textwrap.dedent(
    """
    import sys, uuid
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
    from pgstate import NewEvent, Store
    from pgstate import _telemetry
    from pgstate.machine import Machine, State

    class Lamp(Machine):
        name = "UnconfiguredTelemetryLamp"
        off = State(initial=True)
        on = State()
        switch_on = off.to(on)

    store = Store(sys.argv[1])
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    # No provider: no span is started, not even a non-recording one.
    started = []
    original = _telemetry.operation_span
    _telemetry.operation_span = lambda *args: started.append(args) or original(*args)
    stream = f"otel-none-{uuid.uuid4().hex[:8]}"
    store.append(stream, [NewEvent(type="A", data={})])
    assert store.read_stream(stream)[-1].traceparent is None
    # A context propagated from a request (a remote parent, as an extracted header gives).
    parent = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1))
    token = context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        store.append(stream, [NewEvent(type="B", data={})])
        store.register(Lamp)
        lamp = f"lamp-{uuid.uuid4().hex[:8]}"
        store.create(lamp, Lamp)
        store.transition(lamp, "switch_on")
    finally:
        context.detach(token)
    expected = f"00-{0x1234:032x}-{0x5678:016x}-01"
    assert store.read_stream(stream)[-1].traceparent == expected
    assert store.read_stream(lamp)[-1].traceparent == expected
    assert started == [], started
    print("ok")
    """
)


def test_no_provider_no_span_traceparent_kept(pgstate_db: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, libpq_dsn(pgstate_db)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
