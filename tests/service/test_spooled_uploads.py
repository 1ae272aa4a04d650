"""Issue 21, item 5: the gateway keeps a large upload on disk and reads it by ranges, and bounds the uploads it reads
at once. A spooled file must read exactly as its bytes do (probe, digest, packing), and a 40 MB upload through a
real uvicorn gateway must not cost the gateway its size in memory."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from service.config import LimitSettings, QueueSettings
from service.errors import UnsupportedFormat
from service.gateway import dicomweb
from service.gateway.multipart import SPOOL_ABOVE
from service.inputs import probe, tensor
from service.inputs.spool import Spooled, opener, pieces, whole
from service.queue import payload
from service.queue.admission import upload_digest
from tests.service.harness import engine_for, free_port, make_settings, png_bytes, running, serving_http
from tests.service.test_dicomweb import related

LIMITS = LimitSettings()


def nifti(volume: np.ndarray, compress: bool) -> bytes:
    image = nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.0, 1.0]))
    buffer = io.BytesIO()
    image.to_file_map(image.make_file_map({"image": buffer, "header": buffer}))
    return gzip.compress(buffer.getvalue(), 1) if compress else buffer.getvalue()


def dicom_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(get_testdata_file("CT_small.dcm"), "series/1.dcm")
        archive.writestr("__MACOSX/._1.dcm", b"resource fork")
    return buffer.getvalue()


rng = np.random.default_rng(7)
SAMPLES: dict[str, Callable[[], bytes]] = {
    "nifti": lambda: nifti(rng.integers(0, 2000, (96, 80, 40), dtype=np.int16), False),  # 600 KB
    "nifti-large": lambda: nifti(rng.integers(0, 50, (256, 256, 24), dtype=np.int16), False),  # 3 MB, > 1 MiB chunks
    "nifti-gz": lambda: nifti(rng.integers(0, 2000, (96, 80, 40), dtype=np.int16), True),
    "dicom": lambda: Path(get_testdata_file("CT_small.dcm")).read_bytes(),
    "dicom-zip": dicom_zip,
    "png": lambda: png_bytes(rng.integers(0, 256, (64, 48), dtype=np.uint8)),
    "tensor": lambda: tensor.encode(rng.random((2, 32, 32), dtype=np.float32), "NHW")[1],
}


@pytest.fixture
def spooled(tmp_path: Path) -> Iterator[Callable[[bytes], Spooled]]:
    """Files the way the multipart parser leaves them: open, on disk, closed when the request ends."""
    with contextlib.ExitStack() as files:

        def spool(data: bytes) -> Spooled:
            path = tmp_path / f"spool-{len(files._exit_callbacks)}"
            path.write_bytes(data)
            return Spooled(files.enter_context(path.open("rb")))

        yield spool


def test_a_spooled_file_reads_as_its_bytes(spooled: Callable[[bytes], Spooled]) -> None:
    data = bytes(range(256)) * 5000
    file = spooled(data)
    assert len(file) == len(data)
    assert file[:10] == data[:10] and file[1000:1300] == data[1000:1300] and file[-7:] == data[-7:]
    assert file[len(data) + 5 :] == b"" and whole(file) == data
    assert b"".join(bytes(p) for p in pieces(file, 4096)) == data
    with file.open() as first, opener(file) as second:  # independent positions
        first.seek(500)
        assert second.read(3) == data[:3] and first.read(3) == data[500:503]
        first.seek(-4, io.SEEK_END)
        assert first.read() == data[-4:] and first.tell() == len(data)
    with pytest.raises(TypeError):
        file[3]


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_the_probe_digest_and_packing_agree_for_spooled_and_in_memory_files(
    spooled: Callable[[bytes], Spooled], kind: str
) -> None:
    data = SAMPLES[kind]()
    name = {"tensor": "t.nhw.npy"}.get(kind, "upload")
    in_memory, on_disk = [(name, data)], [(name, spooled(data))]
    assert probe(on_disk, LIMITS) == probe(in_memory, LIMITS)
    meta = {"format": kind}
    assert upload_digest(on_disk, meta) == upload_digest(in_memory, meta)
    packed = payload.pack(on_disk)
    assert packed == payload.pack(in_memory)
    assert payload.unpack(packed, LIMITS.max_upload_bytes) == in_memory


def test_a_spooled_file_is_refused_as_its_bytes_are(spooled: Callable[[bytes], Spooled]) -> None:
    with pytest.raises(UnsupportedFormat):
        probe([("x.bin", spooled(b"not an image at all" * 100_000))], LIMITS)


def series_files(tmp_path: Path, count: int) -> list[Path]:
    """A CT-like series of ``count`` 512 x 512 slices (0.5 MB each: every part under the per-part spool size)."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    template.Rows = template.Columns = 512
    series = generate_uid()
    paths = []
    for k in range(count):
        template.SOPInstanceUID = generate_uid()
        template.SeriesInstanceUID = series
        template.InstanceNumber = k + 1
        template.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        template.PixelData = np.random.default_rng(k).integers(0, 2000, (512, 512), dtype=np.int16).tobytes()
        paths.append(tmp_path / f"{k}.dcm")
        template.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.mark.parametrize("kind", ["volume", "series"])
def test_a_large_upload_costs_the_gateway_chunks_not_its_size(
    tmp_path: Path, redis_url: str, queue_settings: QueueSettings, exported: Path, kind: str
) -> None:
    """Python's allocations in the gateway's process while 40 MB are received, probed, digested and packed into
    Redis (a real uvicorn server; the client streams the files from disk): one NIfTI volume, or a DICOM series of
    80 parts of 0.5 MB. Held whole, the upload alone would be 1x; the gateway keeps a few MiB of it in memory and
    reads the rest from its spool in 1 MiB chunks (about 10 MiB measured, whatever the upload's size)."""
    if kind == "volume":
        volume = np.random.default_rng(1).integers(0, 4000, (512, 512, 80), dtype=np.int16)
        paths = [tmp_path / "ct.nii"]
        paths[0].write_bytes(nifti(volume, False))
        del volume
    else:
        paths = series_files(tmp_path, 80)
    size = sum(path.stat().st_size for path in paths)
    settings = make_settings(redis_url, queue_settings.model_copy(update={"dedupe_window_s": 10}), exported)

    async def scenario() -> int:
        async with serving_http(settings, None, free_port()) as base, httpx.AsyncClient(timeout=120) as http:
            with contextlib.ExitStack() as handles:
                files = [("file", (p.name, handles.enter_context(p.open("rb")), "application/octet-stream"))
                         for p in paths]  # fmt: skip
                tracemalloc.start()
                try:
                    answer = await http.post(f"{base}/v1/segmentations?modality=CT", files=files)
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
            assert answer.status_code == 202, answer.text
            return peak

    peak = asyncio.run(scenario())
    assert size > 40e6
    assert peak < 16 * 2**20, f"{peak / 2**20:.1f} MiB of Python allocations for a {size / 2**20:.1f} MiB upload"


def test_uploads_past_the_concurrent_limit_are_refused_at_once(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    settings = settings.model_copy(update={"limits": settings.limits.model_copy(update={"max_concurrent_uploads": 1})})
    release = asyncio.Event()

    async def slow_body():  # an upload still arriving: it holds the one slot
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        await release.wait()
        yield b"\r\n--b--\r\n"

    async def scenario() -> None:
        async with serving_http(settings, None) as base, httpx.AsyncClient(timeout=30) as http:
            headers = {"content-type": "multipart/form-data; boundary=b"}
            first = asyncio.create_task(http.post(f"{base}/v1/segmentations", content=slow_body(), headers=headers))
            await asyncio.sleep(0.5)
            busy = await http.post(f"{base}/v1/segmentations", files=[("file", ("b.png", b"x", "image/png"))])
            assert busy.status_code == 503, busy.text
            assert busy.json()["code"] == "uploads_busy" and busy.headers["retry-after"] == "5"
            kserve = await http.post(f"{base}/v2/models/c2p/infer", json={"inputs": []})
            assert kserve.status_code == 503 and kserve.json()["error"]  # the v2 protocol's shape too
            assert (await http.get(f"{base}/v2/health/live")).status_code == 200  # only uploads wait
            release.set()
            refused = await first  # the slow one was an empty image: refused for what it is, not for the limit
            assert refused.status_code == 422, refused.text
            again = await http.post(f"{base}/v1/segmentations", files=[("file", ("b.png", b"x", "image/png"))])
            assert again.status_code != 503  # the slot came back

    asyncio.run(scenario())


def large_instance() -> bytes:
    """A 1024 x 1024 16-bit MR slice (2 MiB): past the spool threshold, so STOW-RS keeps it on disk."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 1024
    ds.PixelData = np.random.default_rng(3).integers(0, 900, (1024, 1024), dtype=np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_stow_rs_spools_a_large_instance_and_it_is_segmented(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    instance = large_instance()
    assert len(instance) > SPOOL_ABOVE
    made: list[Spooled] = []
    original = dicomweb.Part.data.fget

    def watched(part: dicomweb.Part) -> object:
        data = original(part)
        if isinstance(data, Spooled):
            made.append(data)
        return data

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            body, content_type = related(instance)
            with mock.patch.object(dicomweb.Part, "data", property(watched)):
                answer = await http.post("/dicomweb/studies", content=body, headers={"content-type": content_type})
            assert answer.status_code == 200, answer.text
            assert made, "the large instance was not spooled"
            (stored,) = answer.json()["00081199"]["Value"]
            path = stored["00081190"]["Value"][0].removeprefix("http://c2p.test")
            job = (await http.get(f"{path}")).json()
            for _ in range(600):
                if job["status"] in ("succeeded", "failed"):
                    break
                await asyncio.sleep(0.05)
                job = (await http.get(path)).json()
            assert job["status"] == "succeeded", job
            assert job["result"]["input"]["shape"] == [1, 1024, 1024]

    asyncio.run(scenario())
