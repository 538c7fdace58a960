"""Traces and metrics through OpenTelemetry's API: receive -> decide -> submit -> complete -> publish.

A run remembers the trace context of the message that planned it (`RunRow.traceparent`), so its
submission and its completion continue the trace of the upload or request that caused it, and
every event queued inside a span carries that span's `traceparent` (the CloudEvents
distributed-tracing extension): one upload can be followed to the model it ended up in.

Without a configured SDK the API is a no-op. `configure()` installs Azure Monitor's distro when
APPLICATIONINSIGHTS_CONNECTION_STRING is set (the Functions app and `retrain serve` call it).
`import function_app` does not load it (the worker is imported on the first invocation); the
OpenTelemetry API it imports is small, the SDK and exporters come only with `configure()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context, metrics, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("retrain.telemetry")
_providers: dict[str, Any] = {}  # tests install in-memory SDK providers here
_instruments: dict[str, Any] = {}


def use_providers(tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Route this module's spans and metrics to the given SDK providers (tests), or back to the global ones."""
    _providers.clear()
    _instruments.clear()
    if tracer_provider is not None:
        _providers["tracer"] = tracer_provider
    if meter_provider is not None:
        _providers["meter"] = meter_provider


def configure(env: Mapping[str, str] | None = None) -> bool:
    """Azure Monitor (Application Insights) when its connection string is set; True if configured."""
    env = os.environ if env is None else env
    if not env.get("APPLICATIONINSIGHTS_CONNECTION_STRING"):
        return False
    try:
        from azure.monitor.opentelemetry import configure_azure_monitor  # noqa: PLC0415 - optional, heavy
    except ImportError:
        log.warning("APPLICATIONINSIGHTS_CONNECTION_STRING is set but azure-monitor-opentelemetry is not installed")
        return False
    configure_azure_monitor(logger_name="retrain")
    return True


def _tracer() -> Any:
    return trace.get_tracer("retrain", tracer_provider=_providers.get("tracer"))


@contextlib.contextmanager
def span(name: str, parent: str | None = None, **attributes: Any) -> Iterator[Any]:
    """A span named `name`. With `parent` (a traceparent: the run's) it continues that trace, and the
    span that was current (say, the status event that reported the run's end) becomes a link."""
    ctx, links = None, []
    if parent:
        ctx = TraceContextTextMapPropagator().extract({"traceparent": parent}, context=context.Context())
        current = trace.get_current_span().get_span_context()
        if current.is_valid:
            links.append(trace.Link(current))
    clean = {k: v for k, v in attributes.items() if isinstance(v, str | bool | int | float)}
    with _tracer().start_as_current_span(name, context=ctx, attributes=clean, links=links) as current_span:
        yield current_span


def mark(name: str, parent: str | None, **attributes: Any) -> None:
    """A point in another trace (no work of its own): e.g. an event's publication, in the trace of
    what caused the event, after the batch that carried it was sent."""
    with span(name, parent=parent, **attributes):
        return


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, or None outside one."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def _instrument(kind: str, name: str, **kwargs: Any) -> Any:
    key = f"{kind}:{name}"
    if key not in _instruments:
        meter = metrics.get_meter("retrain", meter_provider=_providers.get("meter"))
        _instruments[key] = getattr(meter, f"create_{kind}")(name, **kwargs)
    return _instruments[key]


def count(name: str, value: int = 1, **attributes: Any) -> None:
    """Counters: retrain.runs (by outcome), retrain.submit.errors."""
    _instrument("counter", name).add(value, attributes)


def gauge(name: str, value: float, **attributes: Any) -> None:
    """Gauges: retrain.pending.images (per model)."""
    _instrument("gauge", name).set(value, attributes)


def record(name: str, value: float, unit: str = "", **attributes: Any) -> None:
    """Histograms: retrain.image_to_champion.seconds."""
    _instrument("histogram", name, unit=unit).record(value, attributes)
