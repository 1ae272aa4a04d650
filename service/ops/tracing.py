"""Optional OpenTelemetry tracing: one trace per job, from the request at the gateway to the worker that ran it.

Off unless ``tracing.endpoint`` is set (an OTLP/HTTP collector, e.g. http://otel-collector:4318) and the ``tracing``
extra is installed; then every call here is a no-op costing a function call. The gateway opens ``c2p.submit`` (the
caller's own trace continues when its request carries a W3C ``traceparent``) and writes the span's context into the
job's meta; the worker that takes the job, in any process, opens ``c2p.job`` as its child, with ``c2p.decode``,
``c2p.infer`` and ``c2p.encode`` inside, so the queue wait shows as the gap between submit and job.

The provider is this module's, not OpenTelemetry's process-global one: the service never changes what a host
application configured, and tests can configure it more than once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from service.config import TracingSettings

log = logging.getLogger(__name__)

TRACER_NAME = "c2p-serve"
_tracer: Any = None  # an opentelemetry Tracer once configured
_provider: Any = None


def configure(settings: TracingSettings, role: str, exporter: Any = None) -> bool:
    """Start tracing for this process (``role``: gateway, worker or serve); False when it stays off.

    ``exporter`` replaces the OTLP exporter (tests pass an in-memory one; spans are then exported synchronously).
    """
    global _tracer, _provider
    if settings.endpoint is None and exporter is None:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
    except ImportError:
        log.warning("tracing.endpoint is set but OpenTelemetry is not installed (pip install 'c2p-serve[tracing]')")
        return False
    resource = Resource.create({"service.name": settings.service_name, "service.instance.role": role})
    provider = TracerProvider(resource=resource, sampler=ParentBasedTraceIdRatio(settings.sample_ratio))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = str(settings.endpoint).rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if _provider is not None:
        _provider.shutdown()
    _provider = provider
    _tracer = provider.get_tracer(TRACER_NAME)
    log.info("tracing to %s as %s", settings.endpoint or "a test exporter", role)
    return True


def shutdown() -> None:
    """Flush and stop (spans still buffered are sent)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def span(name: str, parent: Mapping[str, str] | None = None, **attributes: Any) -> Iterator[Any]:
    """A span under the current one, or under the context in ``parent`` (a W3C carrier: request headers or a
    job's meta); yields None when tracing is off. Exceptions are recorded on the span and re-raised."""
    if _tracer is None:
        yield None
        return
    context = None
    if parent:
        from opentelemetry.propagate import extract

        context = extract(dict(parent))
    with _tracer.start_as_current_span(name, context=context, attributes=_clean(attributes)) as current:
        yield current


def carrier() -> dict[str, str]:
    """The current span's context as W3C headers (``traceparent``), for a job's meta; empty when tracing is off."""
    if _tracer is None:
        return {}
    from opentelemetry.propagate import inject

    out: dict[str, str] = {}
    inject(out)
    return out


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OpenTelemetry takes str, bool, int, float and lists of them; None is left out rather than sent as 'None'."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out
