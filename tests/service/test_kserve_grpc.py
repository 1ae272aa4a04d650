"""The Open Inference Protocol over gRPC, end to end: a real grpc.aio server on a port, a real worker, real Redis.

The first test drives Triton's own gRPC client, unchanged (synchronous, so through a thread): if tritonclient.grpc can
use it, so can any KServe v2 client. The others use the generated stub for what that client never sends (typed
``contents``) and for the paths that need no worker (deadline, back-pressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from tritonclient import grpc as triton
from tritonclient.utils import InferenceServerException

from service.config import QueueSettings, Settings
from service.grpc import inference_pb2, inference_pb2_grpc
from service.grpc.inference import inference_registration
from service.grpc.server import build_server, stop_server
from service.ops.metrics import Metrics
from service.worker.consumer import Worker
from tests.conftest import TEST_VARIANT
from tests.service.harness import disc_image, engine_for, lane_for, make_settings
from tests.service.test_grpc import free_port


def picture(size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """[H, W, 3] uint8 RGB: a bright disc on a dark, tinted background."""
    grey = disc_image(size, radius=14)
    return np.stack([grey, grey // 2 + 20, 255 - grey], axis=-1)


@dataclass
class Served:
    url: str
    settings: Settings
    client: aioredis.Redis
    metrics: Metrics
    stub: inference_pb2_grpc.GRPCInferenceServiceStub


@contextlib.asynccontextmanager
async def served(settings: Settings, exported: Path | None) -> AsyncIterator[Served]:
    """build_server with the protocol registered, on a free port, and a worker on the same loop (None: no worker)."""
    settings = settings.model_copy(update={"grpc_port": free_port()})
    client = aioredis.Redis.from_url(settings.redis_url)
    metrics = Metrics()
    server = build_server(settings, client, metrics, services=[inference_registration(settings, client, metrics)])
    await server.start()
    url = f"127.0.0.1:{settings.grpc_port}"
    channel = grpc.aio.insecure_channel(url)
    runner = task = None
    try:
        if exported is not None:
            runner = Worker(settings, engine_for(exported), client, metrics, consumer="kserve-grpc-test")
            task = asyncio.create_task(runner.run())
            await asyncio.wait_for(runner.ready.wait(), 10)
        yield Served(url, settings, client, metrics, inference_pb2_grpc.GRPCInferenceServiceStub(channel))
    finally:
        if runner is not None and task is not None:
            runner.stop()
            await asyncio.wait_for(task, 30)
        await channel.close()
        await stop_server(server, 0)
        await client.aclose()


@contextlib.contextmanager
def triton_error(code: grpc.StatusCode, words: str) -> Iterator[None]:
    with pytest.raises(InferenceServerException) as caught:
        yield
    assert caught.value.status() == str(code), (caught.value.status(), caught.value.message())
    assert words in caught.value.message(), caught.value.message()


def _triton_session(url: str, version: str) -> None:
    """Everything a Triton user would do, with the standard gRPC client as shipped."""
    client = triton.InferenceServerClient(url=url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("c2p") and client.is_model_ready(TEST_VARIANT, model_version=version)
        assert not client.is_model_ready("unet") and not client.is_model_ready("c2p", model_version="000000000000")
        assert client.get_server_metadata().name == "c2p-serve"
        meta = client.get_model_metadata("c2p")
        assert meta.name == TEST_VARIANT and list(meta.versions) == [version]
        assert [i.name for i in meta.inputs] == ["image"]
        assert [o.name for o in meta.outputs] == ["mask", "score", "report"]
        with triton_error(grpc.StatusCode.NOT_FOUND, "unknown model"):
            client.get_model_metadata("unet")

        hwc = picture()
        image = triton.InferInput("image", list(hwc.shape), "UINT8")
        image.set_data_from_numpy(hwc)
        result = client.infer("c2p", [image], request_id="7", client_timeout=60)
        mask, score = result.as_numpy("mask"), result.as_numpy("score")
        assert mask.dtype == np.uint8 and mask.shape == (1, *hwc.shape[:2]) and mask.any()
        assert score.dtype == np.float32 and score.shape == (1,) and 0 <= score[0] <= 1
        assert json.loads(result.as_numpy("report")[0])["mask"]["size"] == list(hwc.shape[:2])
        response = result.get_response()
        assert response.id == "7" and response.model_name == TEST_VARIANT and response.model_version == version

        chw = np.ascontiguousarray(hwc.transpose(2, 0, 1)).astype(np.float32) / 255
        floats = triton.InferInput("image", list(chw.shape), "FP32")
        floats.set_data_from_numpy(chw)
        only = [triton.InferRequestedOutput("mask"), triton.InferRequestedOutput("score")]
        same = client.infer(TEST_VARIANT, [floats], model_version=version, outputs=only, parameters={"layout": "CHW"})
        assert [o.name for o in same.get_response().outputs] == ["mask", "score"]
        assert np.array_equal(same.as_numpy("mask"), mask) and np.allclose(same.as_numpy("score"), score)

        image.set_shape([48, 64, 1])  # the bytes of [48, 64, 3] under a shape that needs a third of them
        with triton_error(grpc.StatusCode.INVALID_ARGUMENT, "bytes in raw_input_contents"):
            client.infer("c2p", [image])
        chw[0, 0, 0] = np.nan
        floats.set_data_from_numpy(chw)
        with triton_error(grpc.StatusCode.INVALID_ARGUMENT, "not finite"):
            client.infer("c2p", [floats])
        with triton_error(grpc.StatusCode.NOT_FOUND, "unknown model"):
            client.infer("unet", [floats])
        with triton_error(grpc.StatusCode.NOT_FOUND, "no version"):
            client.infer(TEST_VARIANT, [floats], model_version="000000000000")
    finally:
        client.close()


def test_tritonclient_grpc_works_unchanged(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    version = engine_for(exported).artifact.digest[:12]

    async def scenario() -> None:
        async with served(settings, exported) as s:
            await asyncio.to_thread(_triton_session, s.url, version)
            assert s.metrics.request_success.labels("kserve-grpc")._value.get() == 2
            assert s.metrics.request_failure.labels("kserve-grpc", "invalid_tensor")._value.get() == 2

    asyncio.run(scenario())


def test_typed_contents_match_raw_contents(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    grey = disc_image((40, 56), radius=12)
    tensor = inference_pb2.ModelInferRequest.InferInputTensor

    async def scenario() -> None:
        async with served(settings, exported) as s:
            raw = await s.stub.ModelInfer(
                inference_pb2.ModelInferRequest(
                    model_name="c2p",
                    inputs=[tensor(name="image", datatype="UINT8", shape=grey.shape)],
                    raw_input_contents=[grey.tobytes()],
                ),
                timeout=60,
            )
            typed = await s.stub.ModelInfer(
                inference_pb2.ModelInferRequest(
                    model_name="c2p",
                    inputs=[
                        tensor(
                            name="image",
                            datatype="UINT8",
                            shape=grey.shape,
                            contents=inference_pb2.InferTensorContents(uint_contents=grey.ravel().tolist()),
                        )
                    ],
                ),
                timeout=60,
            )
            assert [o.name for o in typed.outputs] == ["mask", "score", "report"]
            assert list(typed.outputs[0].shape) == [1, 40, 56] and typed.outputs[0].datatype == "UINT8"
            assert typed.raw_output_contents[:2] == raw.raw_output_contents[:2]
            assert typed.parameters["job_id"].string_param != raw.parameters["job_id"].string_param

            wrong = inference_pb2.InferTensorContents(fp32_contents=[0.5] * grey.size)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await s.stub.ModelInfer(
                    inference_pb2.ModelInferRequest(
                        model_name="c2p",
                        inputs=[tensor(name="image", datatype="UINT8", shape=grey.shape, contents=wrong)],
                    ),
                    timeout=10,
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "contents.uint_contents" in (caught.value.details() or "")

    asyncio.run(scenario())


def test_deadline_timeout_and_cancel_delete_the_job_and_a_full_queue_is_resource_exhausted(
    redis_url: str, queue_settings: QueueSettings, tmp_path: Path, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings.model_copy(update={"max_pending": 1}), exported)
    jobs = f"{queue_settings.prefix}:jobs:{lane_for(exported)}"
    grey = disc_image((32, 32), radius=8)
    request = inference_pb2.ModelInferRequest(
        model_name="c2p",
        inputs=[inference_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=grey.shape)],
        raw_input_contents=[grey.tobytes()],
    )

    async def scenario() -> None:
        async with served(settings, None) as s:  # no worker: the job stays queued
            waiting = asyncio.ensure_future(s.stub.ModelInfer(request, timeout=1.5))
            for _ in range(300):
                if await s.client.xlen(jobs) == 1:
                    break
                await asyncio.sleep(0.01)
            assert await s.client.xlen(jobs) == 1
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await s.stub.ModelInfer(request, timeout=5)
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert {k: v for k, v in full.value.trailing_metadata() or ()}["retry-after"] == "5"
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await waiting
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, late.value.details()
            assert "deleted" in (late.value.details() or "")
            await no_jobs_left(s)

            # the request's own ``timeout`` parameter (Triton's microseconds) ends the wait the same way
            timed = inference_pb2.ModelInferRequest()
            timed.CopyFrom(request)
            timed.parameters["timeout"].int64_param = 300_000
            started = asyncio.get_running_loop().time()
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                await s.stub.ModelInfer(timed, timeout=30)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert asyncio.get_running_loop().time() - started < 5
            await no_jobs_left(s)

            # a caller that cancels takes its queued job with it
            call = s.stub.ModelInfer(request)
            for _ in range(300):
                if await s.client.xlen(jobs) == 1:
                    break
                await asyncio.sleep(0.01)
            assert await s.client.xlen(jobs) == 1
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await no_jobs_left(s)
            assert s.metrics.request_success.labels("kserve-grpc")._value.get() == 0

    asyncio.run(scenario())


async def no_jobs_left(s: Served, within_s: float = 5.0) -> None:
    """The stream and every job record empty, soon: a cancelled call's clean-up runs after the client gave up."""
    prefix = s.settings.queue.prefix
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        records = [key async for key in s.client.scan_iter(match=f"{prefix}:job:*")]
        if not records and await s.client.xlen(f"{prefix}:jobs:{lane_for(Path(s.settings.model))}") == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, f"jobs left behind: {records}"
        await asyncio.sleep(0.05)


def test_an_answer_above_the_send_limit_names_the_setting(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    settings.grpc = settings.grpc.model_copy(update={"max_send_message_bytes": 2048})
    grey = disc_image((48, 64), radius=12)  # a 3072-byte mask: above the limit
    request = inference_pb2.ModelInferRequest(
        model_name="c2p",
        inputs=[inference_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=grey.shape)],
        raw_input_contents=[grey.tobytes()],
    )

    async def scenario() -> None:
        async with served(settings, exported) as s:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await s.stub.ModelInfer(request, timeout=60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "C2P_GRPC__MAX_SEND_MESSAGE_BYTES" in (caught.value.details() or "")
            metadata = {k: v for k, v in caught.value.trailing_metadata() or ()}
            assert metadata["c2p-error-code"] == "response_too_large"
            only_score = inference_pb2.ModelInferRequest()
            only_score.CopyFrom(request)
            only_score.outputs.add(name="score")
            answer = await s.stub.ModelInfer(only_score, timeout=60)
            assert [o.name for o in answer.outputs] == ["score"]

    asyncio.run(scenario())
