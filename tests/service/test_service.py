"""The whole request path with real Redis and real files: gateway -> queue -> worker -> result."""

from __future__ import annotations

import asyncio
import gzip
import io
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from service.config import LimitSettings, QueueSettings
from service.outputs import rle
from tests.service.harness import disc_image, engine_for, lane_for, make_settings, png_bytes, running
from tests.service.test_dicom_seg import dciodvfy_errors


def upload(*files: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (name, data, "application/octet-stream")) for name, data in files]


def nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    image = nib.Nifti1Image(data, affine)
    buffer = io.BytesIO()
    image.to_file_map(image.make_file_map({"image": buffer, "header": buffer}))
    return gzip.compress(buffer.getvalue())


def test_sync_and_async_lifecycle(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            image = png_bytes(disc_image())
            sync = await http.post("/v1/segmentations?wait=30", files=upload(("disc.png", image)))
            assert sync.status_code == 200, sync.text
            job = sync.json()
            assert job["status"] == "succeeded"
            result = job["result"]
            assert result["input"]["format"] == "png" and result["input"]["shape"] == [1, 96, 128]
            assert result["mask"]["size"] == [96, 128] and len(result["mask"]["slices"]) == 1
            mask = rle.decode({"size": result["mask"]["size"], "counts": result["mask"]["slices"][0]["counts"]})
            assert mask.shape == (96, 128) and int(mask.sum()) == result["mask"]["slices"][0]["area"]
            assert 0 <= result["reliability"]["score"] <= 1
            assert result["model"]["engine"] == "onnx" and len(result["model"]["digest"]) == 64

            queued = await http.post("/v1/segmentations", files=upload(("disc.png", image)))
            assert queued.status_code == 202
            location = queued.headers["location"]
            assert location == f"/v1/segmentations/{queued.json()['id']}"
            for _ in range(200):
                polled = (await http.get(location)).json()
                if polled["status"] == "succeeded":
                    break
                await asyncio.sleep(0.05)
            assert polled["status"] == "succeeded"
            # the same input gives the same masks whichever way it was asked for
            assert polled["result"]["mask"] == result["mask"]

            assert (await http.delete(location)).status_code == 204
            gone = await http.get(location)
            assert gone.status_code == 404 and gone.json()["code"] == "job_not_found"
            assert (await http.get("/v1/segmentations/not-a-job")).status_code == 404

    asyncio.run(scenario())


def test_nifti_volume_mask_comes_back_on_the_input_grid(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    data = np.zeros((40, 30, 6), dtype=np.int16)
    data[10:30, 8:22, 1:5] = 400
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10, 5, 30]

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            response = await http.post(
                "/v1/segmentations?wait=30&modality=MR", files=upload(("vol.nii.gz", nifti_bytes(data, affine)))
            )
            assert response.status_code == 200, response.text
            result = response.json()["result"]
            assert result["input"]["shape"] == [6, 30, 40]
            assert result["input"]["spacing"] == pytest.approx([2.5, 0.9, 0.8])
            # reoriented for axial slicing (RAS -> LPS voxel order): the same world, x and y reversed
            assert (result["input"]["stored_orientation"], result["input"]["orientation"]) == ("RAS", "LPS")
            canonical = np.asarray(result["input"]["affine"])
            assert np.allclose(canonical @ [0, 0, 3, 1], affine @ [39, 29, 3, 1])
            assert np.allclose(canonical @ [39, 29, 0, 1], affine @ [0, 0, 0, 1])
            assert result["input"]["modality"] == "MR"
            assert result["input"]["preprocessing"]["method"] == "percentile"
            size = result["input"]["preprocessing"]["input_size"]  # the effective resolution (issue 20, item 3)
            assert result["input"]["preprocessing"]["resize"] == "letterbox"  # the aspect kept: one scale for both
            assert result["input"]["preprocessing"]["pixels_per_model_pixel"] == pytest.approx(
                [30 / round(30 * size / 40), 40 / size], abs=1e-4
            )
            assert result["mask"]["size"] == [30, 40]
            assert [s["index"] for s in result["mask"]["slices"]] == list(range(6))
            assert len(result["reliability"]["slices"]) == 6

    asyncio.run(scenario())


def test_dicom_ct_records_its_window(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            response = await http.post("/v1/segmentations?wait=30", files=upload(("ct.dcm", ct)))
            assert response.status_code == 200, response.text
            result = response.json()["result"]
            assert result["input"]["format"] == "dicom" and result["input"]["modality"] == "CT"
            assert result["input"]["preprocessing"]["method"] == "ct-window"
            assert result["input"]["shape"] == [1, 128, 128]
            assert "Patient" not in response.text and "CompressedSamples" not in response.text

    asyncio.run(scenario())


def test_bad_requests_get_a_4xx_with_a_code(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            cases = [
                (upload(("noise.bin", np.random.default_rng(0).bytes(4096))), "", 415, "unsupported_format"),
                (upload(("ct.dcm", ct[: len(ct) // 3])), "", 422, None),
                (upload(("empty.dcm", b"")), "", None, None),
                (upload(("disc.png", png_bytes(disc_image()))), "?wait=100000", 400, "invalid_request"),
                (upload(("disc.png", png_bytes(disc_image()))), "?modality=banana", 400, "invalid_request"),
                (upload(("disc.png", png_bytes(disc_image()))), "?wait=abc", 400, "invalid_request"),
            ]
            for files, query, status, code in cases:
                response = await http.post(f"/v1/segmentations{query}", files=files)
                assert 400 <= response.status_code < 500, (query, response.status_code, response.text)
                if status is not None:
                    assert response.status_code == status, response.text
                body = response.json()
                assert body["code"] and body["message"]
                if code is not None:
                    assert body["code"] == code
            no_field = await http.post("/v1/segmentations", files=[("other", ("x.png", b"123", "image/png"))])
            assert no_field.status_code == 400 and "file" in no_field.json()["message"]
            not_multipart = await http.post("/v1/segmentations", content=b"raw", headers={"content-type": "image/png"})
            assert not_multipart.status_code == 400
            assert (await http.get("/nowhere")).status_code == 404
            # the service still works after all of that
            ok = await http.post("/v1/segmentations?wait=30", files=upload(("disc.png", png_bytes(disc_image()))))
            assert ok.status_code == 200

    asyncio.run(scenario())


def test_limits_answer_413(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    settings.limits = LimitSettings(max_upload_bytes=20_000, max_files=3, max_pixels_per_slice=200 * 200)

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            big = png_bytes(np.random.default_rng(0).integers(0, 255, (150, 150), dtype=np.uint8))
            too_big = await http.post("/v1/segmentations", files=upload(("big.png", big)))
            assert too_big.status_code == 413 and too_big.json()["code"] == "payload_too_large"
            wide = png_bytes(np.zeros((10, 5000), dtype=np.uint8))
            too_wide = await http.post("/v1/segmentations", files=upload(("wide.png", wide)))
            assert too_wide.status_code == 413 and too_wide.json()["code"] == "image_too_large"
            small = png_bytes(disc_image((32, 32), 8))
            many = await http.post("/v1/segmentations", files=upload(*[(f"{i}.png", small) for i in range(4)]))
            assert many.status_code == 413 and many.json()["code"] == "image_too_large"

    asyncio.run(scenario())


def test_queue_full_answers_429_with_retry_after(redis_url: str, exported: Path) -> None:
    queue = QueueSettings(  # the same upload on purpose: not a retry here
        prefix=f"t429{np.random.default_rng().integers(1 << 30)}", max_pending=2, retry_after_s=7, dedupe_window_s=0
    )
    settings = make_settings(redis_url, queue, exported)

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            image = png_bytes(disc_image())
            for _ in range(2):
                assert (await http.post("/v1/segmentations", files=upload(("a.png", image)))).status_code == 202
            full = await http.post("/v1/segmentations", files=upload(("a.png", image)))
            assert full.status_code == 429 and full.json()["code"] == "queue_full"
            assert full.headers["retry-after"] == "7"

    asyncio.run(scenario())


def test_readiness_waits_for_a_warm_worker(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            assert (await http.get("/v2/health/live")).status_code == 200
            not_ready = await http.get("/v2/health/ready")
            assert not_ready.status_code == 503 and not_ready.json()["code"] == "unavailable"
        async with running(settings, engine_for(exported)) as (http, _):
            ready = await http.get("/v2/health/ready")
            assert ready.status_code == 200 and ready.json()["workers"] >= 1
            ok = await http.post("/v1/segmentations?wait=30", files=upload(("d.png", png_bytes(disc_image()))))
            assert ok.status_code == 200
            metrics = await http.get("/metrics")
            assert metrics.status_code == 200
            # Triton's names, ours prefixed: count / exec_count is the mean batch size
            for line in (
                'c2p_inference_request_success_total{api="rest"} 1.0',
                'c2p_inference_request_duration_seconds_count{api="rest"} 1.0',
                "c2p_inference_count_total 1.0",
                "c2p_inference_exec_count_total 1.0",
                'c2p_jobs_total{outcome="succeeded"} 1.0',
            ):
                assert line in metrics.text, line
            gauges_and_histograms = ("c2p_stream_length", "c2p_stream_lag", "c2p_dead_letters", "c2p_decode_duration")
            for name in gauges_and_histograms:
                assert name in metrics.text, name

    asyncio.run(scenario())


def test_liveness_never_depends_on_redis(exported: Path) -> None:
    settings = make_settings("redis://127.0.0.1:1/0", QueueSettings(prefix="tdead"), exported)

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            assert (await http.get("/v2/health/live")).status_code == 200
            ready = await http.get("/v2/health/ready")
            assert ready.status_code == 503
            image = png_bytes(disc_image())
            down = await http.post("/v1/segmentations", files=upload(("a.png", image)))
            assert down.status_code == 503 and down.json()["code"] == "unavailable"

    asyncio.run(scenario())


def test_slices_of_concurrent_jobs_share_batches(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported, max_queue_delay_ms=50.0)

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, worker):
            image = png_bytes(disc_image())
            responses = await asyncio.gather(
                *[http.post("/v1/segmentations?wait=30", files=upload((f"{i}.png", image))) for i in range(8)]
            )
            assert all(r.status_code == 200 for r in responses)
            stats = worker.batcher.stats
            assert stats.inference_count == 8 and stats.execution_count < 8

    asyncio.run(scenario())


def test_openapi_documents_the_result_schema(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            schema = (await http.get("/openapi.json")).json()
            assert "SegmentationResult" in schema["components"]["schemas"]
            assert "Reliability" in schema["components"]["schemas"]
            post = schema["paths"]["/v1/segmentations"]["post"]
            assert "multipart/form-data" in post["requestBody"]["content"]
            assert {"202", "413", "415", "422", "429"} <= set(post["responses"])

    asyncio.run(scenario())


def test_every_pydicom_test_file_gives_a_result_or_a_4xx(
    redis_url: str, queue_settings: QueueSettings, exported: Path, tmp_path: Path
) -> None:
    """The whole corpus through gateway and worker: decodable files succeed, the rest get a coded 4xx
    (at the gateway, or as a failed job), nothing answers 5xx, and the worker survives all of it."""
    from tests.service.test_inputs import ALL_TEST_FILES, pydicom_reference

    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, worker):
            outcomes: dict[int, int] = {}
            seg_refused: list[str] = []
            for path in ALL_TEST_FILES:
                response = await http.post("/v1/segmentations?wait=60", files=upload((path.name, path.read_bytes())))
                outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
                if pydicom_reference(path) is not None:
                    assert response.status_code == 200, (path.name, response.text)
                    assert response.json()["result"]["mask"]["slices"]
                    # every format: made, or refused with a coded 404 (a SEG highdicom cannot build), never a 5xx
                    result_url = f"/v1/segmentations/{response.json()['id']}/result"
                    for fmt in ("dicom-seg", "nifti", "png"):
                        made = await http.get(result_url, params={"format": fmt})
                        assert made.status_code in (200, 404), (path.name, fmt, made.text)
                        if made.status_code == 404:
                            assert made.json()["code"] == "output_not_available", (path.name, fmt, made.text)
                            seg_refused.append(path.name)
                        elif fmt == "dicom-seg":
                            written = tmp_path / f"{path.stem}.seg.dcm"
                            written.write_bytes(made.content)
                            assert hd.seg.segread(written).Modality == "SEG", path.name
                            # errors the source itself has (a UID reused as another UID) are copied, not made
                            made_here = set(dciodvfy_errors(written)) - set(dciodvfy_errors(path))
                            assert not made_here, (path.name, made_here)
                else:
                    assert 400 <= response.status_code < 500, (path.name, response.status_code, response.text)
                    body = response.json()
                    assert body["code"] and body["message"], path.name
            assert outcomes.get(200, 0) > 30 and sum(outcomes.values()) == len(ALL_TEST_FILES)
            assert len(seg_refused) <= outcomes[200] // 4, seg_refused  # most DICOM inputs give a SEG
            assert not worker.stopping.is_set()
            ok = await http.post("/v1/segmentations?wait=30", files=upload(("disc.png", png_bytes(disc_image()))))
            assert ok.status_code == 200

    asyncio.run(scenario())


class CrashingEngine:
    """The real engine's artifact, but every run raises: a job that always kills the engine."""

    def __init__(self, engine: object) -> None:
        self.artifact = engine.artifact
        self.device = "cpu"

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raise RuntimeError("engine crashed")


def test_a_job_that_always_crashes_the_engine_ends_in_the_dead_letters(redis_url: str, exported: Path) -> None:
    queue = QueueSettings(prefix=f"tdl{np.random.default_rng().integers(1 << 30)}", max_deliveries=2, lease_s=0.5)
    settings = make_settings(redis_url, queue, exported)

    async def scenario() -> None:
        async with running(settings, CrashingEngine(engine_for(exported))) as (http, worker):
            response = await http.post("/v1/segmentations?wait=30", files=upload(("a.png", png_bytes(disc_image()))))
            assert response.status_code == 500, response.text  # the service failed it, not the caller
            body = response.json()
            assert body["code"] == "delivery_limit" and "engine crashed" in body["message"]
            job = (await http.get(f"/v1/segmentations/{body['job_id']}")).json()
            assert job["status"] == "failed" and job["deliveries"] >= 2
            stats = await worker.queue.stats(lane_for(exported))
            assert stats.dead_letters == 1 and stats.length == 0
            assert not worker.stopping.is_set()

    asyncio.run(scenario())
