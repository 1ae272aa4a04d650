"""OpenTelemetry: one trace per job, from the caller's request through the queue to the worker's stages."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.config import QueueSettings, TracingSettings
from service.ops import tracing
from tests.service.harness import disc_image, engine_for, make_settings, png_bytes, running
from tests.service.test_service import upload

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def exported_spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure(TracingSettings(), "serve", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def test_a_job_is_one_trace_from_the_request_to_the_worker(
    redis_url: str, queue_settings: QueueSettings, exported: Path, exported_spans: InMemorySpanExporter
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> str:
        async with running(settings, engine_for(exported)) as (http, _):
            headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
            answer = await http.post(
                "/v1/segmentations?wait=30", files=upload(("d.png", png_bytes(disc_image()))), headers=headers
            )
            assert answer.status_code == 200
            return answer.json()["id"]

    job_id = asyncio.run(scenario())
    spans = {span.name: span for span in exported_spans.get_finished_spans()}
    assert {"c2p.submit", "c2p.job", "c2p.decode", "c2p.infer", "c2p.encode"} <= set(spans)
    submit, job = spans["c2p.submit"], spans["c2p.job"]
    # the caller's trace continues: the same trace id everywhere, each span under the one before
    assert {f"{span.context.trace_id:032x}" for span in spans.values()} == {CALLER_TRACE}
    assert f"{submit.parent.span_id:016x}" == CALLER_SPAN
    assert job.parent.span_id == submit.context.span_id  # across the queue, through the job's meta
    for stage in ("c2p.decode", "c2p.infer", "c2p.encode"):
        assert spans[stage].parent.span_id == job.context.span_id
    assert submit.attributes["c2p.job_id"] == job.attributes["c2p.job_id"] == job_id
    assert job.start_time >= submit.start_time and job.end_time >= spans["c2p.encode"].end_time


def test_tracing_is_off_without_an_endpoint() -> None:
    assert not tracing.configure(TracingSettings(), "gateway")
    assert not tracing.enabled() and tracing.carrier() == {}
    with tracing.span("c2p.nothing") as span:
        assert span is None
