"""DICOMweb STOW-RS in, one job per series, answered like an archive; and finished SEGs forwarded to a destination."""

from __future__ import annotations

import asyncio
import io
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from service.config import DicomWebSettings, QueueSettings, Settings
from service.gateway import dicomweb
from tests.service.harness import engine_for, make_settings, running
from tests.service.test_dicom_seg import dciodvfy_errors
from tests.service.test_inputs import ct_series

REFERENCED, FAILED, REASON, RETRIEVE_URL = "00081199", "00081198", "00081197", "00081190"
CLASS_UID, INSTANCE_UID = "00081150", "00081155"


def related(*parts: bytes, boundary: str | None = None, part_type: str = "application/dicom") -> tuple[bytes, str]:
    """A multipart/related body as Orthanc sends it (quoted type, unquoted boundary, no trailing CRLF)."""
    boundary = boundary or f"{uuid.uuid4()}-{uuid.uuid4()}"
    body = b"".join(
        b"--%s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s\r\n"
        % (boundary.encode(), part_type.encode(), len(p), p)
        for p in parts
    )
    body += b"--%s--" % boundary.encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def mr_instance(study: str | None = None) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    if study:
        ds.StudyInstanceUID = study
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def uid_of(data: bytes, keyword: str) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).get(keyword))


def items(body: dict, tag: str) -> list[dict]:
    return body.get(tag, {}).get("Value", [])


def test_stow_rs_stores_series_as_jobs_and_reports_failures(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    ct = [data for _, data in ct_series()[0]]
    study = uid_of(ct[0], "StudyInstanceUID")
    mr = mr_instance()

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            body, content_type = related(*ct, mr, b"not dicom at all")
            answer = await http.post("/dicomweb/studies", content=body, headers={"content-type": content_type})
            assert answer.status_code == 202, answer.text
            assert answer.headers["content-type"] == "application/dicom+json"
            stored = items(answer.json(), REFERENCED)
            assert {i[INSTANCE_UID]["Value"][0] for i in stored} == {uid_of(d, "SOPInstanceUID") for d in [*ct, mr]}
            (failed,) = items(answer.json(), FAILED)
            assert failed[REASON]["Value"] == [dicomweb.CANNOT_UNDERSTAND] and INSTANCE_UID not in failed
            jobs = {i[RETRIEVE_URL]["Value"][0] for i in stored}
            assert len(jobs) == 2  # one job per series
            for url in jobs:
                path = url.removeprefix("http://c2p.test")
                for _ in range(600):
                    job = (await http.get(path)).json()
                    if job["status"] in ("succeeded", "failed"):
                        break
                    await asyncio.sleep(0.05)
                assert job["status"] == "succeeded", job
                assert job["result"]["input"]["format"] == "dicom"
            shapes = sorted([(await http.get(u.removeprefix("http://c2p.test"))).json()["result"]["input"]["shape"][0]
                             for u in jobs])  # fmt: skip
            assert shapes == [1, 4]

            # all refused: 409; the study in the URL must match
            body, content_type = related(mr_instance())
            answer = await http.post(f"/dicomweb/studies/{study}", content=body, headers={"content-type": content_type})
            assert answer.status_code == 409
            assert items(answer.json(), FAILED)[0][REASON]["Value"] == [dicomweb.DOES_NOT_MATCH]
            body, content_type = related(ct[0])
            answer = await http.post(f"/dicomweb/studies/{study}", content=body, headers={"content-type": content_type})
            assert answer.status_code == 200 and FAILED not in answer.json()

            # not STOW-RS at all
            answer = await http.post("/dicomweb/studies", content=b"x", headers={"content-type": "application/json"})
            assert (answer.status_code, answer.json()["code"]) == (415, "unsupported_media_type")
            json_parts = 'multipart/related; type="application/dicom+json"; boundary=b'
            answer = await http.post("/dicomweb/studies", content=b"x", headers={"content-type": json_parts})
            assert answer.status_code == 415
            body, content_type = related()
            answer = await http.post("/dicomweb/studies", content=body, headers={"content-type": content_type})
            assert (answer.status_code, answer.json()["code"]) == (400, "invalid_request")

    asyncio.run(scenario())


def test_stow_rs_limits_refuse_a_series_with_out_of_resources(
    redis_url: str, queue_settings: QueueSettings, tmp_path: Path, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    settings.limits = settings.limits.model_copy(update={"max_slices": 2})
    ct = [data for _, data in ct_series()[0]]

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            body, content_type = related(*ct, mr_instance())
            answer = await http.post("/dicomweb/studies", content=body, headers={"content-type": content_type})
            assert answer.status_code == 202
            failed = items(answer.json(), FAILED)
            assert len(failed) == 4 and {f[REASON]["Value"][0] for f in failed} == {dicomweb.OUT_OF_RESOURCES}
            assert len(items(answer.json(), REFERENCED)) == 1
            big = settings.limits.max_upload_bytes + 1
            headers = {"content-type": content_type, "content-length": str(big)}
            answer = await http.post("/dicomweb/studies", content=b"x" * 10, headers=headers)
            assert answer.status_code == 413

    asyncio.run(scenario())


class Destination(BaseHTTPRequestHandler):
    """A STOW-RS destination that answers from a script: each POST takes the next status."""

    protocol_version = "HTTP/1.1"
    script: list[int]
    received: list[bytes]

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        body = self.rfile.read(length)
        status = self.script.pop(0) if self.script else 200
        self.received.append(body)
        answer = b"{}"
        if status == 200:
            ds = pydicom.dcmread(io.BytesIO(body[body.index(b"\r\n\r\n") + 4 :]), force=True)
            answer = (
                b'{"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["%s"]}}]}}'
                % str(ds.SOPInstanceUID).encode()
            )
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def destination() -> Iterator[tuple[str, type[Destination]]]:
    handler = type("Scripted", (Destination,), {"script": [], "received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://user:secret@127.0.0.1:{server.server_address[1]}/dicom-web/", handler
    finally:
        server.shutdown()
        server.server_close()


def test_finished_segs_are_forwarded_with_retries_and_refusals_recorded(
    redis_url: str,
    queue_settings: QueueSettings,
    exported: Path,
    destination: tuple[str, type[Destination]],
    tmp_path: Path,
) -> None:
    url, handler = destination
    settings = make_settings(redis_url, queue_settings, exported)
    settings.dicomweb = DicomWebSettings(destination_url=url, attempts=3, backoff_s=0.05, timeout_s=10)
    ct = [data for _, data in ct_series()[0]]

    async def forwarded(http: object, body: bytes, content_type: str) -> dict:
        answer = await http.post("/dicomweb/studies", content=body, headers={"content-type": content_type})  # type: ignore[attr-defined]
        job_url = items(answer.json(), REFERENCED)[0][RETRIEVE_URL]["Value"][0].removeprefix("http://c2p.test")
        for _ in range(600):
            job = (await http.get(job_url)).json()  # type: ignore[attr-defined]
            if job.get("forwarding") and job["forwarding"]["status"] != "pending":
                return job
            await asyncio.sleep(0.05)
        raise AssertionError(f"forwarding did not finish: {job}")

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            handler.script[:] = [503, 503]  # down twice, then up
            job = await forwarded(http, *related(*ct))
            sent = job["forwarding"]
            assert sent["status"] == "sent" and sent["attempts"] == 3, sent
            assert "secret" not in sent["destination"] and sent["destination"].endswith("/dicom-web/")
            assert len(handler.received) == 3
            part = handler.received[-1].split(b"\r\n\r\n", 1)[1]
            seg = pydicom.dcmread(io.BytesIO(part), force=True)
            assert seg.Modality == "SEG" and seg.SOPInstanceUID == sent["sop_instance_uid"]
            (tmp_path / "forwarded.dcm").write_bytes(part[: part.rindex(b"\r\n--")])
            assert dciodvfy_errors(tmp_path / "forwarded.dcm") == []
            assert seg.StudyInstanceUID == uid_of(ct[0], "StudyInstanceUID")

            handler.script[:] = [400]  # refused: no retry
            handler.received.clear()
            copies = []
            series_uid = generate_uid()  # another series, so it is a new job
            for data in ct:
                ds = pydicom.dcmread(io.BytesIO(data))
                ds.SeriesInstanceUID = series_uid
                ds.SOPInstanceUID = generate_uid()
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                copies.append(buffer.getvalue())
            job = await forwarded(http, *related(*copies))
            failed = job["forwarding"]
            assert failed["status"] == "failed" and failed["attempts"] == 1 and "400" in failed["error"]
            assert len(handler.received) == 1

    asyncio.run(scenario())


def test_retrieve_urls_keep_the_port_or_use_the_public_url(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    """(issue 20, item 4) A PACS on another port follows RetrieveURL: it must carry the port it posted to, or the
    configured public base behind a proxy."""
    ct = [data for _, data in ct_series()[0]][:1]
    body, content_type = related(*ct)

    async def retrieve_url(settings: Settings, host: str) -> str:
        async with running(settings, None, worker=False) as (http, _):
            answer = await http.post(
                "/dicomweb/studies", content=body, headers={"content-type": content_type, "host": host}
            )
            assert answer.status_code == 200, answer.text
            return items(answer.json(), REFERENCED)[0][RETRIEVE_URL]["Value"][0]

    async def scenario() -> None:
        settings = make_settings(redis_url, queue_settings, exported)
        assert (await retrieve_url(settings, "pacs-bridge.example:8443")).startswith(
            "http://pacs-bridge.example:8443/v1/segmentations/"
        )
        behind = settings.model_copy(update={"public_url": "https://c2p.example.org/ai/"})
        assert (await retrieve_url(behind, "10.0.0.7:8000")).startswith("https://c2p.example.org/ai/v1/segmentations/")

    asyncio.run(scenario())


def test_objects_without_an_image_are_acknowledged_and_an_instance_sent_twice_counts_once(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    """(issue 20, item 4) A PACS sends a study whole: its structured reports, key objects, presentation states and
    SEGs are acknowledged with a warning and not segmented, never failed; a retried instance is stored once."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ct = [data for _, data in ct_series()[0]][:2]
    study = uid_of(ct[0], "StudyInstanceUID")

    def non_image(sop_class: str) -> bytes:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, generate_uid(), "SR"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    report = non_image("1.2.840.10008.5.1.4.1.1.88.22")  # Enhanced SR
    key_objects = non_image("1.2.840.10008.5.1.4.1.1.88.59")  # Key Object Selection
    state = non_image("1.2.840.10008.5.1.4.1.1.11.1")  # Grayscale Softcopy Presentation State
    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            body, content_type = related(*ct, ct[0], report, key_objects, state)
            answer = await http.post("/dicomweb/studies", content=body, headers={"content-type": content_type})
            assert answer.status_code == 202, answer.text  # stored, with warnings
            assert FAILED not in answer.json()
            stored = items(answer.json(), REFERENCED)
            assert len(stored) == 5  # two images (the repeat counted once) and three acknowledged objects
            urls = {i[RETRIEVE_URL]["Value"][0] for i in stored if RETRIEVE_URL in i}
            assert len(urls) == 1  # one job: the CT series
            warned = [i for i in stored if "00081196" in i]
            assert {i[INSTANCE_UID]["Value"][0] for i in warned} == {
                uid_of(d, "SOPInstanceUID") for d in (report, key_objects, state)
            }
            assert all(i["00081196"]["Value"] == [dicomweb.NOT_SEGMENTED] and RETRIEVE_URL not in i for i in warned)
            job = (await http.get(urls.pop().split("c2p.test")[-1])).json()
            assert job["status"] == "queued"

    asyncio.run(scenario())
