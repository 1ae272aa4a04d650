"""GET /v1/segmentations/{id}/result?format=: JSON, DICOM SEG, NIfTI and PNG from a real worker, and the same files
from ``c2p segment --format``."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from service.cli import main
from service.config import QueueSettings, SegSettings
from service.outputs import rle
from tests.service.harness import disc_image, engine_for, make_settings, png_bytes, running
from tests.service.test_dicom_seg import dciodvfy_errors
from tests.service.test_inputs import ct_series
from tests.service.test_service import upload


def masks_of(job: dict) -> np.ndarray:
    result = job["result"]
    z = result["input"]["shape"][0]
    masks = np.zeros((z, *result["mask"]["size"]), np.uint8)
    for entry in result["mask"]["slices"]:
        masks[entry["index"]] = rle.decode({"size": result["mask"]["size"], "counts": entry["counts"]})
    return masks


def nifti_image(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def test_every_format_of_a_picture_and_the_errors(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            image = disc_image((96, 128))
            job = (await http.post("/v1/segmentations?wait=30", files=upload(("disc.png", png_bytes(image))))).json()
            base = f"/v1/segmentations/{job['id']}/result"

            as_json = await http.get(base)
            assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
            assert json.loads(as_json.content) == job["result"]

            labelmap = await http.get(base, params={"format": "nifti"})
            assert labelmap.status_code == 200
            assert job["id"] in labelmap.headers["content-disposition"]
            volume = nifti_image(labelmap.content)
            assert volume.shape == (128, 96, 1) and volume.get_data_dtype() == np.uint8
            assert np.array_equal(np.asarray(volume.dataobj).transpose(2, 1, 0), masks_of(job))

            overlay = await http.get(base, params={"format": "png", "slice": 0})
            assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
            rgb = np.asarray(Image.open(io.BytesIO(overlay.content)))
            assert rgb.shape == (96, 128, 3)
            inside = masks_of(job)[0].astype(bool)
            assert inside.any() and not inside.all()
            # outside the mask the picture is the input, grey; inside it is tinted red
            assert np.array_equal(rgb[~inside][:, 0], image[~inside]) and np.array_equal(
                rgb[~inside][:, 1], image[~inside]
            )
            assert (rgb[inside][:, 0].astype(int) >= rgb[inside][:, 1]).all()
            assert (await http.get(base, params={"format": "png"})).content == overlay.content  # default: largest

            for params, status, code in (
                ({"format": "dicom-seg"}, 404, "output_not_available"),  # a PNG has no DICOM to reference
                ({"format": "png", "slice": 1}, 404, "output_not_available"),
                ({"format": "gif"}, 400, "invalid_request"),
                ({"format": "json", "slice": 0}, 400, "invalid_request"),
                ({"format": "png", "slice": -1}, 400, "invalid_request"),
            ):
                answer = await http.get(base, params=params)
                assert (answer.status_code, answer.json()["code"]) == (status, code), (params, answer.text)
            assert (await http.get("/v1/segmentations/nope/result")).status_code == 404

            await http.delete(f"/v1/segmentations/{job['id']}")  # what was kept goes with the job
            assert (await http.get(base, params={"format": "png"})).status_code == 404
            prefix = settings.queue.prefix
            assert not [k async for k in _keys(http, settings, f"{prefix}:outputs:{job['id']}")]

    asyncio.run(scenario())


async def _keys(http: object, settings: object, pattern: str):  # type: ignore[no-untyped-def]
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.redis_url)  # type: ignore[attr-defined]
    try:
        for key in [k async for k in client.scan_iter(match=pattern)]:
            yield key
    finally:
        await client.aclose()


def test_a_queued_job_has_no_result_yet(
    redis_url: str, queue_settings: QueueSettings, tmp_path: Path, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            job = (await http.post("/v1/segmentations", files=upload(("d.png", png_bytes(disc_image()))))).json()
            answer = await http.get(f"/v1/segmentations/{job['id']}/result", params={"format": "nifti"})
            assert answer.status_code == 409 and answer.json()["code"] == "result_not_ready"

    asyncio.run(scenario())


def test_a_dicom_series_as_seg_nifti_and_png(
    redis_url: str, queue_settings: QueueSettings, exported: Path, tmp_path: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    settings = settings.model_copy(update={"seg": SegSettings(series_number=42, series_description="c2p test")})
    files, _ = ct_series()
    sources = {pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID: pydicom.dcmread(io.BytesIO(data)) for _, data in files}

    async def scenario() -> tuple[dict, bytes, bytes]:
        async with running(settings, engine_for(exported)) as (http, _):
            job = (await http.post("/v1/segmentations?wait=60", files=upload(*files))).json()
            assert job["status"] == "succeeded", job
            base = f"/v1/segmentations/{job['id']}/result"
            seg = await http.get(base, params={"format": "dicom-seg"})
            assert seg.status_code == 200 and seg.headers["content-type"] == "application/dicom"
            labelmap = await http.get(base, params={"format": "nifti"})
            for z in range(4):
                overlay = await http.get(base, params={"format": "png", "slice": z})
                assert overlay.status_code == 200
                assert Image.open(io.BytesIO(overlay.content)).size == (128, 128)
            return job, seg.content, labelmap.content

    job, seg_bytes, nifti_bytes = asyncio.run(scenario())
    masks = masks_of(job)

    volume = nifti_image(nifti_bytes)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    assert np.allclose(volume.affine, lps_to_ras @ np.array(job["result"]["input"]["affine"]), atol=1e-5)
    assert np.array_equal(np.asarray(volume.dataobj).transpose(2, 1, 0), masks)

    path = tmp_path / "seg.dcm"
    path.write_bytes(seg_bytes)
    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    assert seg.SeriesNumber == 42 and seg.SeriesDescription == "RESEARCH USE ONLY c2p test"  # C2P_SEG__* settings
    ordered = [entry["sop_instance_uid"] for entry in _instances(job, files)]
    first = sources[ordered[0]]
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == [
        float(v) for v in first.PixelSpacing
    ]
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(sources)
    non_empty = [z for z in range(len(masks)) if masks[z].any()]
    assert int(seg.NumberOfFrames) == max(len(non_empty), 1)
    for frame in seg.PerFrameFunctionalGroupsSequence[: len(non_empty)]:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in sources[uid].ImagePositionPatient])
    for z in non_empty:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[ordered[z]], segment_numbers=[1], ignore_spatial_locations=True
        )
        assert np.array_equal(pixels[0, :, :, 0], masks[z])


def _instances(job: dict, files: list[tuple[str, bytes]]) -> list[dict]:
    """The SOP instance UIDs in slice order: sorted along the normal, as the service sorts them."""
    datasets = [pydicom.dcmread(io.BytesIO(data)) for _, data in files]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return [{"sop_instance_uid": ds.SOPInstanceUID} for ds in datasets]


@pytest.mark.slow
def test_c2p_segment_writes_the_same_formats(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    series = tmp_path / "series"
    series.mkdir()
    for name, data in ct_series()[0]:
        (series / name).write_bytes(data)
    picture = tmp_path / "disc.png"
    picture.write_bytes(png_bytes(disc_image()))
    out = tmp_path / "out"
    code = main(
        ["segment", str(series), str(picture), "--out", str(out), "--format", "json,dicom-seg,nifti,png",
         "--model", str(exported)]
    )  # fmt: skip
    assert code == 0  # the PNG cannot have a DICOM SEG: skipped with its reason, the rest still written
    summary = {Path(entry["input"]).name: entry for entry in json.loads(capsys.readouterr().out)}
    assert "dicom-seg" in summary["disc.png"]["skipped"], summary["disc.png"]
    assert {Path(p).name for p in summary["disc.png"]["outputs"]} == {"disc.json", "disc.nii.gz", "disc.png"}
    assert {Path(p).name for p in summary["series"]["outputs"]} == {
        "series.json", "series.seg.dcm", "series.nii.gz", "series.png"
    }  # fmt: skip
    assert dciodvfy_errors(out / "series.seg.dcm") == []
    assert hd.seg.segread(out / "series.seg.dcm").SeriesDescription


def test_the_gateway_never_loads_torch_or_highdicom() -> None:
    """What a gateway imports is what it costs in memory: neither the network's framework nor the SEG writer,
    which only a worker making a DICOM SEG needs (highdicom alone is ~20 MB)."""
    import subprocess
    import sys

    probe = (
        "import sys, service.gateway.app, service.inputs, service.grpc.server, service.outputs.formats;"
        "print(sorted(m for m in ('torch', 'highdicom', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
