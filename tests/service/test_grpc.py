"""The c2p.v1 gRPC API over a real socket, with real Redis and a real worker: every RPC, the error
mapping, limits, deadlines, back-pressure, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.config import GrpcSettings, LimitSettings, QueueSettings, Settings
from service.grpc import inference_pb2, inference_pb2_grpc, segmentation_pb2, segmentation_pb2_grpc
from service.grpc.convert import job_from_proto
from service.grpc.server import Registration, build_server, stop_server
from service.ops.metrics import Metrics
from service.outputs import rle
from service.queue import JobQueue
from service.worker.consumer import Worker
from service.worker.engine import Engine
from tests.service.harness import disc_image, engine_for, lane_for, make_settings, png_bytes

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAST = GrpcSettings(health_interval_s=0.1, watch_interval_s=0.02)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlowEngine:
    """The real engine, slowed down, so that a job stays "running" long enough to be seen running."""

    def __init__(self, engine: Engine, delay_s: float) -> None:
        self.inner = engine
        self.delay_s = delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(self.delay_s)
        return self.inner.run(images)


@dataclass
class Serving:
    settings: Settings
    channel: grpc.aio.Channel
    stub: segmentation_pb2_grpc.SegmentationStub
    client: aioredis.Redis
    queue: JobQueue
    metrics: Metrics
    workers: list[tuple[Worker, asyncio.Task[None]]] = field(default_factory=list)

    async def start_worker(self, engine: Engine) -> Worker:
        worker = Worker(self.settings, engine, self.client, self.metrics, consumer=f"grpc-test-{len(self.workers)}")
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 10)
        self.workers.append((worker, task))
        return worker

    async def stop_workers(self) -> None:
        while self.workers:
            worker, task = self.workers.pop()
            worker.stop()
            await asyncio.wait_for(task, 30)

    async def health(self, service: str = "") -> int:
        response = await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service))
        return response.status

    async def health_becomes(self, status: int, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while await self.health() != status:
            assert time.monotonic() < deadline, f"health never became {status}"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, config: GrpcSettings = FAST, services: tuple[Registration, ...] = ()
) -> AsyncIterator[Serving]:
    settings = settings.model_copy(update={"grpc_port": free_port()})
    client = aioredis.Redis.from_url(settings.redis_url)
    metrics = Metrics()
    server = build_server(settings, client, metrics, config, services)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
    state = Serving(
        settings,
        channel,
        segmentation_pb2_grpc.SegmentationStub(channel),
        client,
        JobQueue(client, settings.queue, lane=lane_for(Path(settings.model))),
        metrics,
    )
    try:
        yield state
    finally:
        await state.stop_workers()
        await channel.close()
        await stop_server(server, 0)
        await client.aclose()


def png_request(wait_s: float = 0, image: bytes | None = None, **fields: Any) -> Any:
    data = png_bytes(disc_image()) if image is None else image
    return segmentation_pb2.SegmentRequest(
        files=[segmentation_pb2.File(name="disc.png", data=data)], wait_seconds=wait_s, **fields
    )


def trailers(err: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: value for key, value in (err.trailing_metadata() or ())}


@contextlib.contextmanager
def rpc_error(code: grpc.StatusCode, error_code: str | None = None) -> Iterator[list[grpc.aio.AioRpcError]]:
    caught: list[grpc.aio.AioRpcError] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        yield caught
    assert info.value.code() == code, (info.value.code(), info.value.details())
    if error_code is not None:
        assert trailers(info.value).get("c2p-error-code") == error_code, trailers(info.value)
    caught.append(info.value)


def masks(job: Any) -> list[tuple[int, str, int]]:
    return [(s.index, s.counts, s.area) for s in job.result.mask.slices]


def test_every_rpc_against_a_worker(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> None:
        async with serving(settings) as s:
            await s.start_worker(engine_for(exported))
            # unary, waiting for the result
            job = await s.stub.Segment(png_request(wait_s=30), timeout=60)
            assert job.status == "succeeded" and job.HasField("result") and not job.HasField("error")
            result = job.result
            assert list(result.input.shape) == [1, 96, 128] and result.input.format == "png"
            assert list(result.mask.size) == [96, 128] and len(result.mask.slices) == 1
            mask = rle.decode({"size": list(result.mask.size), "counts": result.mask.slices[0].counts})
            assert mask.shape == (96, 128) and int(mask.sum()) == result.mask.slices[0].area
            assert 0 <= result.reliability.score <= 1 and result.model.engine == "onnx"
            assert job_from_proto(job).result is not None  # what arrives is a valid schema Job

            # unary without waiting, then polling
            queued = await s.stub.Segment(png_request(), timeout=10)
            assert queued.status in ("queued", "running") and not queued.HasField("result")
            for _ in range(400):
                polled = await s.stub.GetSegmentation(segmentation_pb2.GetSegmentationRequest(id=queued.id))
                if polled.status == "succeeded":
                    break
                await asyncio.sleep(0.05)
            assert polled.status == "succeeded" and masks(polled) == masks(job)

            # client streaming: one file in three chunks, the options on the first
            data = png_bytes(disc_image())
            pieces = [data[:100], data[100:-50], data[-50:]]

            async def chunks() -> AsyncIterator[Any]:
                for i, piece in enumerate(pieces):
                    yield segmentation_pb2.SegmentChunk(
                        name="disc.png" if i == 0 else "",
                        data=piece,
                        last=i == len(pieces) - 1,
                        **({"wait_seconds": 30, "modality": "us"} if i == 0 else {}),
                    )

            streamed = await s.stub.SegmentStream(chunks(), timeout=60)
            assert streamed.status == "succeeded" and masks(streamed) == masks(job)
            assert streamed.result.input.modality == "US"

            # a job that fails on the worker answers with the job's error as the call's status
            broken = data[: len(data) // 2]  # the header passes the gateway's probe; the pixels do not decode
            with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "invalid_image") as caught:
                await s.stub.Segment(png_request(wait_s=30, image=broken), timeout=60)
            failed_id = trailers(caught[0])["c2p-job-id"]
            failed = await s.stub.GetSegmentation(segmentation_pb2.GetSegmentationRequest(id=failed_id))
            assert failed.status == "failed" and failed.error.code == "invalid_image"

            # delete, then the job is gone
            await s.stub.DeleteSegmentation(segmentation_pb2.DeleteSegmentationRequest(id=job.id))
            with rpc_error(grpc.StatusCode.NOT_FOUND, "job_not_found"):
                await s.stub.GetSegmentation(segmentation_pb2.GetSegmentationRequest(id=job.id))
            with rpc_error(grpc.StatusCode.NOT_FOUND, "job_not_found"):
                await s.stub.DeleteSegmentation(segmentation_pb2.DeleteSegmentationRequest(id=job.id))
            with rpc_error(grpc.StatusCode.NOT_FOUND, "job_not_found"):
                await s.stub.GetSegmentation(segmentation_pb2.GetSegmentationRequest(id="not a job"))

            assert s.metrics.request_success.labels("grpc")._value.get() == 3
            assert s.metrics.request_failure.labels("grpc", "job_not_found")._value.get() == 3
            assert s.metrics.request_failure.labels("grpc", "invalid_image")._value.get() == 1

    asyncio.run(scenario())


def test_health_and_watch_follow_the_worker(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> None:
        async with serving(settings) as s:
            assert await s.health() == NOT_SERVING
            assert await s.health("c2p.v1.Segmentation") == NOT_SERVING
            with rpc_error(grpc.StatusCode.NOT_FOUND):
                await s.health("no.such.Service")
            health_watch = health_pb2_grpc.HealthStub(s.channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await health_watch.read()).status == NOT_SERVING

            queued = await s.stub.Segment(png_request(), timeout=10)
            assert queued.status == "queued"
            watch = s.stub.WatchSegmentation(segmentation_pb2.WatchSegmentationRequest(id=queued.id), timeout=60)
            seen: list[str] = []

            async def follow() -> None:
                async for job in watch:
                    seen.append(job.status)

            follower = asyncio.create_task(follow())
            await asyncio.sleep(0.3)
            assert seen == ["queued"]  # changes only: nothing more while it waits

            await s.start_worker(SlowEngine(engine_for(exported), 0.5))
            await s.health_becomes(SERVING)
            assert await s.health("c2p.v1.Segmentation") == SERVING
            await asyncio.wait_for(follower, 30)  # the stream ends by itself after a terminal status
            assert seen == ["queued", "running", "succeeded"]

            await s.stop_workers()  # the worker withdraws its announcement
            await s.health_becomes(NOT_SERVING)
            assert [(await health_watch.read()).status for _ in range(2)] == [SERVING, NOT_SERVING]
            health_watch.cancel()

            with rpc_error(grpc.StatusCode.NOT_FOUND, "job_not_found"):
                async for _ in s.stub.WatchSegmentation(segmentation_pb2.WatchSegmentationRequest(id="A" * 22)):
                    pass

    asyncio.run(scenario())


def test_bad_input_and_limits_map_to_status_codes(
    redis_url: str, queue_settings: QueueSettings, tmp_path: Path, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)  # no worker: the gateway routes by the model's card
    settings.limits = LimitSettings(max_upload_bytes=20_000, max_files=3)
    config = FAST.model_copy(update={"max_receive_message_bytes": 64 * 1024})

    async def scenario() -> None:
        async with serving(settings, config) as s:
            noise = np.random.default_rng(0).bytes(4096)
            with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "unsupported_format") as caught:
                await s.stub.Segment(png_request(image=noise), timeout=10)
            assert caught[0].details()
            with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"):
                await s.stub.Segment(png_request(modality="banana"), timeout=10)
            with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"):
                await s.stub.Segment(png_request(wait_s=100_000), timeout=10)
            with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"):
                await s.stub.Segment(segmentation_pb2.SegmentRequest(), timeout=10)
            small = png_bytes(disc_image((32, 32), 8))
            many = segmentation_pb2.SegmentRequest(
                files=[segmentation_pb2.File(name=f"{i}.png", data=small) for i in range(4)]
            )
            with rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "image_too_large"):
                await s.stub.Segment(many, timeout=10)
            big = png_bytes(np.random.default_rng(0).integers(0, 255, (150, 150), dtype=np.uint8))
            assert 20_000 < len(big) < 64 * 1024
            with rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "payload_too_large"):
                await s.stub.Segment(png_request(image=big), timeout=10)

            # above the transport's message limit: refused by gRPC itself, before any handler runs
            with rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED):
                await s.stub.Segment(png_request(image=bytes(100 * 1024)), timeout=10)

            async def stream(*chunks: tuple[str, bytes, bool]) -> Any:
                async def gen() -> AsyncIterator[Any]:
                    for name, data, last in chunks:
                        yield segmentation_pb2.SegmentChunk(name=name, data=data, last=last)

                return await s.stub.SegmentStream(gen(), timeout=10)

            piece = bytes(8_000)  # each chunk below the message limit; together above the upload limit
            with rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "payload_too_large"):
                await stream(("a", piece, False), ("a", piece, False), ("a", piece, True))
            with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "invalid_request") as caught:
                await stream(("a.png", small[:10], False))
            assert "last" in caught[0].details()
            with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"):
                await stream(("a.png", small[:10], False), ("b.png", small[10:], True))
            with rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"):
                await stream()
            with rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "image_too_large"):
                await stream(*[(f"{i}.png", small, True) for i in range(4)])
            # the service still answers after all of that, and nothing was queued
            assert (await s.stub.Segment(png_request(), timeout=10)).status == "queued"
            assert (await s.queue.stats()).length == 1

    asyncio.run(scenario())


async def _no_jobs_left(s: Serving, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        records = [key async for key in s.client.scan_iter(match=f"{s.settings.queue.prefix}:job:*")]
        if not records and (await s.queue.stats()).length == 0:
            return
        assert time.monotonic() < deadline, f"jobs left behind: {records}"
        await asyncio.sleep(0.05)


def test_a_caller_that_gives_up_takes_its_queued_job_with_it(
    redis_url: str, queue_settings: QueueSettings, tmp_path: Path, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)  # no worker: the gateway routes by the model's card

    async def scenario() -> None:
        async with serving(settings) as s:  # no worker: jobs stay queued
            started = time.monotonic()
            with rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED):
                await s.stub.Segment(png_request(wait_s=30), timeout=0.5)
            assert time.monotonic() - started < 2
            await _no_jobs_left(s)
            assert s.metrics.request_success.labels("grpc")._value.get() == 0

            call = s.stub.Segment(png_request(wait_s=30))
            for _ in range(100):  # until the job exists
                if (await s.queue.stats()).length:
                    break
                await asyncio.sleep(0.02)
            assert (await s.queue.stats()).length == 1
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await _no_jobs_left(s)

            # a wait shorter than the deadline is an ordinary wait: the job stays queued
            job = await s.stub.Segment(png_request(wait_s=0.2), timeout=10)
            assert job.status == "queued"
            assert (await s.queue.stats()).length == 1

    asyncio.run(scenario())


def test_a_full_queue_answers_resource_exhausted_with_retry_after(
    redis_url: str, tmp_path: Path, exported: Path
) -> None:
    queue = QueueSettings(  # the same upload on purpose: not a retry here
        prefix=f"tgrpc{np.random.default_rng().integers(1 << 30)}", max_pending=1, retry_after_s=7, dedupe_window_s=0
    )
    settings = make_settings(redis_url, queue, exported)  # no worker: the gateway routes by the model's card

    async def scenario() -> None:
        async with serving(settings) as s:
            assert (await s.stub.Segment(png_request(), timeout=10)).status == "queued"
            with rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full") as caught:
                await s.stub.Segment(png_request(), timeout=10)
            assert trailers(caught[0])["retry-after"] == "7"
            assert s.metrics.request_failure.labels("grpc", "queue_full")._value.get() == 1

    asyncio.run(scenario())


def test_reflection_lists_and_describes_the_services(
    redis_url: str, queue_settings: QueueSettings, tmp_path: Path, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)  # no worker: the gateway routes by the model's card
    # The Open Inference Protocol as a further service (its servicer here answers UNIMPLEMENTED): its file
    # lives in a private descriptor pool, which reflection must still be able to describe.
    inference = Registration(
        inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        lambda server: inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            inference_pb2_grpc.GRPCInferenceServiceServicer(), server
        ),
    )

    async def scenario() -> None:
        async with serving(settings, services=(inference,)) as s:
            stub = reflection_pb2_grpc.ServerReflectionStub(s.channel)
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="c2p.v1.Segmentation"),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.ModelInferRequest"),
            ]
            responses = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=10)]
            names = {service.name for service in responses[0].list_services_response.service}
            assert names == {
                "c2p.v1.Segmentation",
                "inference.GRPCInferenceService",
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            }
            for response, wanted in zip(
                responses[1:], ("c2p/v1/segmentation.proto", "inference/grpc_service.proto"), strict=True
            ):
                assert not response.HasField("error_response"), response.error_response
                files = response.file_descriptor_response.file_descriptor_proto
                assert any(wanted.encode() in blob for blob in files)
            assert await s.health("inference.GRPCInferenceService") == NOT_SERVING
            with rpc_error(grpc.StatusCode.UNIMPLEMENTED):
                await inference_pb2_grpc.GRPCInferenceServiceStub(s.channel).ServerLive(
                    inference_pb2.ServerLiveRequest()
                )

    asyncio.run(scenario())
