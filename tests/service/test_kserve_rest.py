"""The Open Inference Protocol (KServe v2) over REST, end to end: real app, real worker, real Redis.

Responses are read with tritonclient's own parser (``InferResult.from_response_body``), and the last test drives the
standard client itself, unchanged, against a real uvicorn server: if Triton's client can read it, so can any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
import uvicorn
from tritonclient import http as triton
from tritonclient.utils import InferenceServerException

from service.config import LimitSettings, QueueSettings, Settings
from service.gateway import kserve_request
from service.gateway.app import create_app
from service.ops.metrics import Metrics
from service.outputs import rle
from service.worker.consumer import Worker
from tests.conftest import TEST_VARIANT
from tests.service.harness import disc_image, engine_for, lane_for, make_settings, png_bytes, running

HEADER = "Inference-Header-Content-Length"


def discs(count: int = 1, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """[N, H, W, 3] uint8 RGB pictures of discs of different radii (a bright disc on a dark, tinted background)."""
    images = []
    for k in range(count):
        grey = disc_image(size, radius=10 + 4 * k)
        images.append(np.stack([grey, grey // 2 + 20, 255 - grey], axis=-1))
    return np.stack(images)


def v2_request(
    array: np.ndarray,
    *,
    binary: bool = True,
    datatype: str | None = None,
    shape: list[int] | None = None,
    parameters: dict[str, Any] | None = None,
    outputs: list[dict[str, Any]] | None = None,
    name: str = "image",
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """An inference request as tritonclient builds one: JSON data, or the binary tensor data extension."""
    item: dict[str, Any] = {
        "name": name,
        "shape": list(array.shape) if shape is None else shape,
        "datatype": datatype or {"uint8": "UINT8", "float32": "FP32"}[array.dtype.name],
    }
    raw = array.tobytes()
    if binary:
        item["parameters"] = {"binary_data_size": len(raw)}
    else:
        item["data"] = array.tolist()
    body: dict[str, Any] = {"inputs": [item]}
    if parameters:
        body["parameters"] = parameters
    if outputs is not None:
        body["outputs"] = outputs
    if request_id is not None:
        body["id"] = request_id
    head = json.dumps(body).encode()
    if not binary:
        return head, {"content-type": "application/json"}
    return head + raw, {HEADER: str(len(head)), "content-type": "application/octet-stream"}


async def settle() -> None:
    """Let the app's first stats refresh finish before a short-lived app shuts down: redis-py (8.1) sometimes swallows
    a cancellation that lands inside a command, and app.py's stats loop then never ends (reported to the lead)."""
    await asyncio.sleep(0.3)


def read_result(response: httpx.Response) -> triton.InferResult:
    assert response.status_code == 200, response.text
    length = response.headers.get(HEADER)
    return triton.InferResult.from_response_body(
        response.content, header_length=None if length is None else int(length)
    )


def report_of(result: triton.InferResult) -> dict[str, Any]:
    (report,) = result.as_numpy("report")
    return json.loads(report)


async def infer(http: httpx.AsyncClient, array: np.ndarray, model: str = "c2p", **kwargs: Any) -> triton.InferResult:
    content, headers = v2_request(array, **kwargs)
    return read_result(await http.post(f"/v2/models/{model}/infer", content=content, headers=headers))


def v1_masks(job: dict[str, Any]) -> np.ndarray:
    mask = job["result"]["mask"]
    return np.stack([rle.decode({"size": mask["size"], "counts": s["counts"]}) for s in mask["slices"]])


def test_metadata_and_model_readiness(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    engine = engine_for(exported)
    version = engine.artifact.digest[:12]

    async def scenario() -> None:
        async with running(settings, engine, worker=False) as (http, _):
            await settle()
            server = (await http.get("/v2")).json()
            assert server["name"] == "c2p-serve" and server["version"] and server["extensions"] == []
            # the gateway knows the model from its card (jobs are routed before any worker runs); no worker: not ready
            meta = (await http.get("/v2/models/c2p")).json()
            assert meta["name"] == TEST_VARIANT and meta["versions"] == [version]
            assert meta["properties"]["ready"] == "false"
            not_ready = await http.get("/v2/models/c2p/ready")
            assert not_ready.status_code == 503 and "not ready" in not_ready.json()["error"]
            assert (await http.get(f"/v2/models/{TEST_VARIANT}/ready")).status_code == 503
            assert (await http.get("/v2/models/unknown/ready")).status_code == 404

        async with running(settings, engine) as (http, _):
            for model in ("c2p", TEST_VARIANT):
                meta = (await http.get(f"/v2/models/{model}")).json()
                assert meta["name"] == TEST_VARIANT and meta["versions"] == [version]
                assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1]}]
                assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
                    ("mask", "UINT8", [-1, -1, -1]),
                    ("score", "FP32", [-1]),
                    ("report", "BYTES", [1]),
                ]
                assert meta["properties"]["input.image.datatypes"] == "UINT8,FP32"
                assert all(isinstance(v, str) for v in meta["properties"].values())
                assert (await http.get(f"/v2/models/{model}/versions/{version}")).json() == meta
                for path in (f"/v2/models/{model}/ready", f"/v2/models/{model}/versions/{version}/ready"):
                    ready = await http.get(path)
                    assert ready.status_code == 200 and ready.json() == {"name": TEST_VARIANT, "ready": True}
            for path in ("/v2/models/unet", "/v2/models/unet/ready", f"/v2/models/c2p/versions/{'0' * 12}/ready"):
                missing = await http.get(path)
                assert missing.status_code == 404, path
                assert set(missing.json()) == {"error", "code"} and "c2p" in missing.json()["error"]
            content, headers = v2_request(discs()[0])
            unknown = await http.post("/v2/models/unet/infer", content=content, headers=headers)
            assert unknown.status_code == 404 and "unknown model 'unet'" in unknown.json()["error"]

    asyncio.run(scenario())


def test_round_trips_give_the_masks_of_every_other_path(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    # Outlier suppression compares neighbouring slices; off, a batch's slices must match the pictures sent alone.
    settings = make_settings(redis_url, queue_settings, exported, suppress_outliers=False)
    engine = engine_for(exported)
    batch = discs(3)
    picture = batch[1]
    height, width = picture.shape[:2]

    async def scenario() -> None:
        async with running(settings, engine) as (http, _):
            files = [("file", ("disc.png", png_bytes(picture), "image/png"))]
            sync = await http.post("/v1/segmentations?wait=30", files=files)
            assert sync.status_code == 200, sync.text
            v1 = sync.json()
            reference = v1_masks(v1)

            # UINT8 HWC (RGB), binary in and out, as tritonclient sends by default
            result = await infer(http, picture, parameters={"binary_data_output": True}, request_id="r-1")
            response = result.get_response()
            assert response["id"] == "r-1" and response["model_name"] == TEST_VARIANT
            assert response["model_version"] == engine.artifact.digest[:12]
            assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
            mask = result.as_numpy("mask")
            assert mask.dtype == np.uint8 and mask.shape == (1, height, width)
            assert np.array_equal(mask, reference)
            score = result.as_numpy("score")
            assert score.dtype == np.float32 and score.shape == (1,)
            report = report_of(result)
            assert report["input"]["format"] == "tensor" and report["input"]["channels"] == 3
            assert (
                report["input"]["shape"] == [1, height, width] and report["input"]["preprocessing"]["method"] == "rgb"
            )
            assert score[0] == pytest.approx(report["reliability"]["slices"][0]["score"])
            assert report["mask"] == v1["result"]["mask"]

            # the same picture as JSON data, answered as JSON
            as_json = await infer(http, picture, binary=False)
            assert all("data" in o for o in as_json.get_response()["outputs"])
            assert np.array_equal(as_json.as_numpy("mask"), reference)

            # FP32 CHW in [0, 1]: the same pixels once scaled back to 8 bits
            chw = np.ascontiguousarray(picture.transpose(2, 0, 1)).astype(np.float32) / 255
            assert np.array_equal((await infer(http, chw)).as_numpy("mask"), reference)

            # a batch NHWC of 3 pictures: 3 slices, each the mask of its picture sent alone
            stacked = await infer(http, batch)
            assert stacked.as_numpy("mask").shape == (3, height, width) and stacked.as_numpy("score").shape == (3,)
            for k in range(3):
                alone = (await infer(http, batch[k])).as_numpy("mask")[0]
                assert (stacked.as_numpy("mask")[k] == alone).mean() > 0.999

            # UINT8 HW grey as nested JSON, FP32 HW grey as binary: grey slices, intensities by percentiles
            grey = disc_image((40, 56), radius=12)
            as_uint8 = await infer(http, grey, binary=False, parameters={"modality": "us"})
            assert as_uint8.as_numpy("mask").shape == (1, 40, 56)
            grey_report = report_of(as_uint8)
            assert grey_report["input"]["channels"] == 1 and grey_report["input"]["modality"] == "US"
            as_float = report_of(await infer(http, grey.astype(np.float32) * 3 - 100, parameters={"modality": "MR"}))
            assert as_float["input"]["shape"] == [1, 40, 56] and as_float["input"]["channels"] == 1
            assert as_float["input"]["preprocessing"]["method"] == "percentile"

            # FP32 grey in Hounsfield units with modality CT: the CT window
            hu = np.where(grey > 100, 40.0, -1000.0).astype(np.float32)
            ct = report_of(await infer(http, hu, parameters={"modality": "CT"}))
            assert ct["input"]["modality"] == "CT" and ct["input"]["preprocessing"]["method"] == "ct-window"

            # an explicit layout: three grey slices that the shape alone would read as one CHW picture
            slices = np.stack([grey] * 3)
            assert (await infer(http, slices)).as_numpy("mask").shape == (1, 40, 56)
            nhw = await infer(http, slices, parameters={"layout": "NHW"})
            assert nhw.as_numpy("mask").shape == (3, 40, 56)

            # asked-for outputs only, each in the form asked for
            chosen = await infer(
                http,
                picture,
                outputs=[{"name": "score", "parameters": {"binary_data": False}}, {"name": "mask"}],
            )
            assert [o["name"] for o in chosen.get_response()["outputs"]] == ["score", "mask"]
            assert chosen.as_numpy("report") is None and np.array_equal(chosen.as_numpy("mask"), reference)

            # a gzip request body, as tritonclient's request_compression_algorithm sends it
            content, headers = v2_request(picture)
            zipped = await http.post(
                "/v2/models/c2p/infer", content=gzip.compress(content), headers={**headers, "content-encoding": "gzip"}
            )
            assert np.array_equal(read_result(zipped).as_numpy("mask"), reference)

    asyncio.run(scenario())


def _bad_requests() -> Iterator[tuple[str, bytes, dict[str, str], int, str, str]]:
    """(case, body, headers, status, code, words in the message)."""
    grey = np.zeros((8, 8), np.uint8)

    def case(label: str, status: int, code: str, words: str, array: np.ndarray = grey, **kwargs: Any) -> Any:
        return (label, *v2_request(array, **kwargs), status, code, words)

    yield case("rank 1", 400, "invalid_tensor", "rank 1", np.zeros(5, np.uint8))
    yield case("rank 5", 400, "invalid_tensor", "rank 5", np.zeros((1, 1, 2, 2, 3), np.uint8))
    yield case(
        "datatype", 400, "invalid_tensor", "datatype 'INT16' is not accepted", grey.astype(np.int16), datatype="INT16"
    )
    yield case(
        "shape vs bytes", 400, "invalid_tensor", "64 bytes of binary data, shape [4, 4] of UINT8 needs 16", shape=[4, 4]
    )
    yield case(
        "shape vs data",
        400,
        "invalid_tensor",
        "'data' holds 64 values, shape [4, 4] needs 16",
        grey.ravel(),
        binary=False,
        shape=[4, 4],
    )
    yield case("nested shape", 400, "invalid_tensor", "nested 'data' has shape [8, 8]", binary=False, shape=[4, 16])
    yield case(
        "FP32 bytes", 400, "invalid_tensor", "64 bytes of binary data, shape [8, 8] of FP32 needs 256", datatype="FP32"
    )
    yield case(
        "channels", 400, "invalid_tensor", "2 channels", np.zeros((8, 8, 2), np.uint8), parameters={"layout": "HWC"}
    )
    yield case("layout", 400, "invalid_tensor", "layout NHWC needs 4", parameters={"layout": "nhwc"})
    yield case("name", 400, "invalid_tensor", "unknown input 'input0'", name="input0")
    yield case(
        "uint8 range", 400, "invalid_tensor", "0..255", grey.astype(np.int32) + 300, binary=False, datatype="UINT8"
    )
    yield case("uint8 floats", 400, "invalid_tensor", "must be integers", grey + 0.5, binary=False, datatype="UINT8")
    nan = np.zeros((8, 8), np.float32)
    nan[3, 3] = np.nan
    yield case("NaN binary", 400, "invalid_tensor", "not finite", nan)
    yield case("NaN JSON", 400, "invalid_tensor", "not finite", nan, binary=False)
    yield case("RGB float range", 400, "invalid_tensor", "[0, 1]", np.full((8, 8, 3), 200, np.float32))
    yield case("modality", 400, "invalid_request", "unknown modality 'XX'", parameters={"modality": "XX"})
    yield case("too many pixels", 413, "image_too_large", "pixels per slice", np.zeros((40, 40), np.uint8))
    yield case("too many bytes", 413, "payload_too_large", "limit of 20000 bytes", np.zeros((150, 150), np.uint8))
    # (the test lowers the JSON caps to 15000 bytes and 64 mask values)
    yield case(
        "JSON too long",
        413,
        "payload_too_large",
        "send large tensors as binary",
        np.zeros((80, 80), np.uint8),
        binary=False,
    )
    mask_json = [{"name": "mask", "parameters": {"binary_data": False}}]
    yield case(
        "mask too long", 400, "invalid_request", "ask for it as binary", np.zeros((9, 9), np.uint8), outputs=mask_json
    )
    content, headers = v2_request(grey)
    yield ("extra bytes", content + b"\x00", headers, 400, "invalid_tensor", "65 bytes follow the JSON header")
    yield ("header length", content, {HEADER: "99999"}, 400, "invalid_request", "does not fit")
    yield ("not JSON", b"{inputs: 1}", {}, 400, "invalid_request", "not valid JSON")
    two = json.dumps({"inputs": [{"name": "image"}, {"name": "image"}]}).encode()
    yield ("two inputs", two, {}, 400, "invalid_request", "exactly one input")
    yield ("gzip", b"not gzip", {"content-encoding": "gzip"}, 400, "invalid_request", "corrupt")
    ragged = json.dumps({"inputs": [{"name": "image", "shape": [2, 2], "datatype": "UINT8", "data": [[1, 2], [3]]}]})
    yield ("ragged", ragged.encode(), {}, 400, "invalid_tensor", "not a regular array")


def test_bad_tensors_are_refused_before_the_queue(
    redis_url: str, queue_settings: QueueSettings, exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kserve_request, "JSON_MAX_BYTES", 15_000)
    monkeypatch.setattr(kserve_request, "JSON_MAX_VALUES", 64)
    settings = make_settings(redis_url, queue_settings, exported)
    settings = settings.model_copy(update={"limits": LimitSettings(max_upload_bytes=20_000, max_pixels_per_slice=1000)})

    async def scenario() -> None:
        async with running(settings, engine_for(exported), worker=False) as (http, _):
            await settle()
            for label, content, headers, status, code, words in _bad_requests():
                response = await http.post("/v2/models/c2p/infer", content=content, headers=headers)
                assert response.status_code == status, (label, response.text)
                body = response.json()
                assert body["code"] == code and words in body["error"], (label, body)
            client = aioredis.Redis.from_url(redis_url)
            try:
                assert await client.xlen(f"{queue_settings.prefix}:jobs:{lane_for(exported)}") == 0
            finally:
                await client.aclose()

    asyncio.run(scenario())


def test_a_job_not_done_in_time_is_deleted_and_a_full_queue_answers_429(redis_url: str, exported: Path) -> None:
    queue = QueueSettings(prefix="t-kserve-full", max_pending=1, retry_after_s=7)
    settings = make_settings(redis_url, queue, exported)

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            async with running(settings, engine_for(exported), worker=False) as (http, _):
                content, headers = v2_request(discs()[0], parameters={"timeout": 200_000})  # microseconds
                late = await http.post("/v2/models/c2p/infer", content=content, headers=headers)
                assert late.status_code == 504, late.text
                assert late.json()["code"] == "deadline_exceeded" and "deleted" in late.json()["error"]
                assert await client.xlen(f"{queue.prefix}:jobs:{lane_for(exported)}") == 0
                assert [k async for k in client.scan_iter(match=f"{queue.prefix}:job:*")] == []

                content, headers = v2_request(discs()[0], parameters={"timeout": 1_000_000})
                first = asyncio.create_task(http.post("/v2/models/c2p/infer", content=content, headers=headers))
                for _ in range(300):
                    if await client.xlen(f"{queue.prefix}:jobs:{lane_for(exported)}") == 1:
                        break
                    await asyncio.sleep(0.01)
                full = await http.post("/v2/models/c2p/infer", content=content, headers=headers)
                assert full.status_code == 429 and full.headers["retry-after"] == "7"
                assert full.json()["code"] == "queue_full" and full.json()["error"]
                assert (await first).status_code == 504
        finally:
            keys = [k async for k in client.scan_iter(match=f"{queue.prefix}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

    asyncio.run(scenario())


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the test runner owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def served(settings: Settings, exported: Path, *, worker: bool = True) -> AsyncIterator[str]:
    """The gateway on a real socket (a free port) and optionally a worker, on this loop; yields host:port."""
    client = aioredis.Redis.from_url(settings.redis_url or "")
    metrics = Metrics()
    app = create_app(settings, metrics, client)
    runner = Worker(settings, engine_for(exported), client, metrics, consumer="triton-test") if worker else None
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False))
    tasks = [asyncio.create_task(server.serve(sockets=[sock]))]
    if runner is not None:
        tasks.append(asyncio.create_task(runner.run()))
    try:
        if runner is not None:
            await asyncio.wait_for(runner.ready.wait(), 10)
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started
        await settle()
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        if runner is not None:
            runner.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        sock.close()
        await client.aclose()


def _triton_session(url: str, version: str) -> None:
    """Everything a Triton user would do, with the standard client as shipped (synchronous, gevent-based)."""
    client = triton.InferenceServerClient(url=url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("c2p") and client.is_model_ready(TEST_VARIANT, model_version=version)
        assert not client.is_model_ready("unet")
        assert client.get_server_metadata()["name"] == "c2p-serve"
        meta = client.get_model_metadata("c2p")
        assert meta["name"] == TEST_VARIANT and [i["name"] for i in meta["inputs"]] == ["image"]
        with pytest.raises(InferenceServerException) as unknown:
            client.get_model_metadata("unet")
        assert unknown.value.status() == "404" and "unknown model" in unknown.value.message()

        picture = discs()[0]
        image = triton.InferInput("image", list(picture.shape), "UINT8")
        image.set_data_from_numpy(picture, binary_data=True)
        result = client.infer("c2p", [image])
        mask, score = result.as_numpy("mask"), result.as_numpy("score")
        assert mask.dtype == np.uint8 and mask.shape == (1, *picture.shape[:2]) and mask.any()
        assert score.dtype == np.float32 and score.shape == (1,) and 0 <= score[0] <= 1
        assert json.loads(result.as_numpy("report")[0])["mask"]["size"] == list(picture.shape[:2])

        image.set_data_from_numpy(picture, binary_data=False)
        outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in ("mask", "score")]
        as_json = client.infer(TEST_VARIANT, [image], model_version=version, outputs=outputs, request_id="7")
        assert as_json.get_response()["id"] == "7"
        assert np.array_equal(as_json.as_numpy("mask"), mask) and np.allclose(as_json.as_numpy("score"), score)

        chw = np.ascontiguousarray(picture.transpose(2, 0, 1)).astype(np.float32) / 255
        floats = triton.InferInput("image", list(chw.shape), "FP32")
        floats.set_data_from_numpy(chw)
        zipped = client.infer("c2p", [floats], parameters={"layout": "CHW"}, request_compression_algorithm="gzip")
        assert np.array_equal(zipped.as_numpy("mask"), mask)

        chw[0, 0, 0] = np.nan
        floats.set_data_from_numpy(chw)
        with pytest.raises(InferenceServerException) as bad:
            client.infer("c2p", [floats])
        assert bad.value.status() == "400" and "not finite" in bad.value.message()
    finally:
        client.close()


def test_tritonclient_works_unchanged(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    version = engine_for(exported).artifact.digest[:12]

    async def scenario() -> None:
        async with served(settings, exported) as url:
            await asyncio.to_thread(_triton_session, url, version)

    asyncio.run(scenario())


def test_a_client_that_hangs_up_stops_waiting_and_its_job_is_deleted(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    jobs = f"{queue_settings.prefix}:jobs:{lane_for(exported)}"

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            async with served(settings, exported, worker=False) as url:
                host, port = url.split(":")
                content, headers = v2_request(discs()[0])
                head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "content-length": len(content)}.items())
                _reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(f"POST /v2/models/c2p/infer HTTP/1.1\r\nhost: {url}\r\n{head}\r\n".encode() + content)
                await writer.drain()
                for _ in range(300):
                    if await client.xlen(jobs) == 1:
                        break
                    await asyncio.sleep(0.01)
                assert await client.xlen(jobs) == 1
                writer.close()
                await writer.wait_closed()
                for _ in range(300):
                    if await client.xlen(jobs) == 0:
                        break
                    await asyncio.sleep(0.01)
                assert await client.xlen(jobs) == 0
                assert [k async for k in client.scan_iter(match=f"{queue_settings.prefix}:job:*")] == []
        finally:
            await client.aclose()

    asyncio.run(scenario())
