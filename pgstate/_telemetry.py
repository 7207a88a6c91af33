"""Optional OpenTelemetry: a span per transition, and the W3C traceparent of the current
context stored with each event. Without ``opentelemetry-api`` installed, all of it is a
no-op that costs one attribute lookup."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

try:
    from opentelemetry import trace
    from opentelemetry.trace import Span, Status, StatusCode
except ImportError:  # pragma: no cover - exercised only without the extra
    trace = None  # type: ignore[assignment]

T = TypeVar("T")
_TRACER_NAME = "pgstate"


def _format(span: Any) -> str | None:
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The traceparent of the active span, if any."""
    if trace is None:
        return None
    return _format(trace.get_current_span())


def _records_nothing() -> bool:
    """True until an SDK installs a tracer provider: the API's own providers hand out spans
    that record nothing, and starting one still costs about 38,000 instructions a write."""
    provider = trace.get_tracer_provider()
    return isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


class TransitionSpan:
    def __init__(self, span: Span | None, traceparent: str | None = None) -> None:
        self._span = span
        self.traceparent = _format(span) if span is not None else traceparent

    def record(self, result: T) -> T:
        span = self._span
        if span is not None:
            outcome = getattr(result, "outcome", None)
            if outcome is None:
                outcome = "duplicate" if getattr(result, "duplicate", False) else "applied"
            span.set_attribute("pgstate.outcome", str(outcome))
            for attribute in ("from_state", "to_state", "version", "lock_wait_us"):
                value = getattr(result, attribute, None)
                if value is not None:
                    span.set_attribute(f"pgstate.{attribute}", value)
            error = getattr(result, "error", None)
            if error is not None:
                span.set_attribute("pgstate.sqlstate", str(getattr(error, "sqlstate", "")))
                span.set_attribute("pgstate.current_state", str(error.current_state))
        return result


# Without OpenTelemetry every write shares this one: no generator, no span object.
_NO_SPAN: contextlib.AbstractContextManager[TransitionSpan] = contextlib.nullcontext(
    TransitionSpan(None)
)


def _unrecorded() -> contextlib.AbstractContextManager[TransitionSpan]:
    # The traceparent a non-recording span would have carried: its parent's, if any (a
    # context propagated from a request is still stored with the events).
    return contextlib.nullcontext(TransitionSpan(None, current_traceparent()))


def transition_span(
    stream_id: str, event: str
) -> contextlib.AbstractContextManager[TransitionSpan]:
    if trace is None:
        return _NO_SPAN
    if _records_nothing():
        return _unrecorded()
    return operation_span(
        "pgstate.transition", {"pgstate.stream_id": stream_id, "pgstate.event": event}
    )


def append_span(
    stream_id: str, events: object
) -> contextlib.AbstractContextManager[TransitionSpan]:
    if trace is None:
        return _NO_SPAN
    if _records_nothing():
        return _unrecorded()
    # events is not validated yet: the append itself rejects what is not a list.
    count = len(events) if isinstance(events, list | tuple) else 0
    return operation_span(
        "pgstate.append", {"pgstate.stream_id": str(stream_id), "pgstate.events": count}
    )


@contextlib.contextmanager
def operation_span(name: str, attributes: dict[str, Any]) -> Iterator[TransitionSpan]:
    """A span around one write; ``record`` adds the outcome, errors add their SQLSTATE."""
    if trace is None:
        yield TransitionSpan(None)
        return
    tracer = trace.get_tracer(_TRACER_NAME)
    with tracer.start_as_current_span(
        name,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield TransitionSpan(span)
        except Exception as exc:
            sqlstate = getattr(exc, "sqlstate", None)
            span.set_attribute("pgstate.outcome", "rejected")
            if sqlstate:
                span.set_attribute("pgstate.sqlstate", sqlstate)
            current_state = getattr(exc, "current_state", None)
            if current_state is not None:
                span.set_attribute("pgstate.current_state", current_state)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
