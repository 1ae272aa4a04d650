"""The Orthanc harness against a real Orthanc, and a record of what Orthanc's STOW-RS client really sends.

The STOW-RS test doubles as the specification of the service's STOW-RS endpoint: it checks the request
Orthanc (DICOMweb plugin 1.7) makes and the answers it accepts or refuses, with a receiver that is nothing
more than ``http.server``, so that what it asserts is Orthanc's behaviour and not some framework's.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.service.orthanc import Orthanc, OrthancError, free_port, orthanc_available, running_orthanc

pytestmark = pytest.mark.skipif(orthanc_available() is not None, reason=str(orthanc_available()))


def dicom_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def one_study() -> list[bytes]:
    """Three instances, two series, one study: CT_small as shipped, a second CT slice, MR_small moved in.

    Two series so that the tests see whether Orthanc splits a study push per series (it does not).
    """
    ct_path = get_testdata_file("CT_small.dcm")
    mr_path = get_testdata_file("MR_small.dcm")
    assert ct_path is not None and mr_path is not None
    ct = pydicom.dcmread(ct_path)
    second = pydicom.dcmread(ct_path)
    second.SOPInstanceUID = generate_uid()
    second.file_meta.MediaStorageSOPInstanceUID = second.SOPInstanceUID
    second.InstanceNumber = 2
    mr = pydicom.dcmread(mr_path)
    for tag in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex"):
        setattr(mr, tag, getattr(ct, tag, ""))
    return [Path(ct_path).read_bytes(), dicom_bytes(second), dicom_bytes(mr)]


def test_upload_find_download_and_stable_series(tmp_path: Path) -> None:
    files = one_study()
    with running_orthanc(tmp_path) as orthanc:
        assert orthanc.get("/system")["Version"]
        assert "dicom-web" in orthanc.get("/plugins")
        answers = [orthanc.upload(data) for data in files]
        assert {answer["Status"] for answer in answers} == {"Success"}
        assert len({answer["ParentStudy"] for answer in answers}) == 1
        assert orthanc.upload(files[0])["Status"] == "AlreadyStored"

        datasets = [pydicom.dcmread(io.BytesIO(data)) for data in files]
        study_uid = datasets[0].StudyInstanceUID
        instances = orthanc.instances_of_study(study_uid)
        assert [(i["SOPInstanceUID"], i["SOPClassUID"], i["SeriesInstanceUID"]) for i in instances] == sorted(
            (ds.SOPInstanceUID, ds.SOPClassUID, ds.SeriesInstanceUID) for ds in datasets
        )
        assert {i["ID"] for i in instances} == {answer["ID"] for answer in answers}
        assert {i["ParentSeries"] for i in instances} == {answer["ParentSeries"] for answer in answers}
        assert orthanc.instances_of_study(generate_uid()) == []

        by_uid = {ds.SOPInstanceUID: data for ds, data in zip(datasets, files, strict=True)}
        for instance in instances:
            downloaded = orthanc.download(instance["ID"])
            assert downloaded == by_uid[instance["SOPInstanceUID"]]  # stored as uploaded, byte for byte
            assert pydicom.dcmread(io.BytesIO(downloaded)).SOPInstanceUID == instance["SOPInstanceUID"]

        # StableAge is 2 s: both series announce themselves soon after the last upload.
        def stable_series() -> set[str]:
            changes = orthanc.changes()["Changes"]
            stable = {change["ID"] for change in changes if change["ChangeType"] == "StableSeries"}
            return stable if len(stable) == 2 else set()

        assert orthanc.wait_for(stable_series, timeout_s=20) == {answer["ParentSeries"] for answer in answers}


@dataclass
class StowRequest:
    """One POST as the receiver saw it: the decoded body, and how it was framed on the wire."""

    path: str
    headers: dict[str, str]
    body: bytes
    chunked: bool


@dataclass
class StowReceiver:
    """A STOW-RS server reduced to recording requests; answers ``status`` with a PS3.18 store response."""

    url: str
    requests: list[StowRequest] = field(default_factory=list)
    status: int = 200
    missing: int = 0  # leave this many instances out of ReferencedSOPSequence (a partial store)


def multipart_parts(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart body (RFC 2046): the boundary from the header, each part's headers and content."""
    message = Message()
    message["Content-Type"] = content_type
    boundary = message.get_param("boundary")
    assert isinstance(boundary, str), content_type
    delimiter = b"\r\n--" + boundary.encode()
    sections = (b"\r\n" + body).split(delimiter)
    assert sections[-1].startswith(b"--"), "no closing delimiter"
    parts = []
    for section in sections[1:-1]:
        head, separator, content = section.partition(b"\r\n\r\n")
        assert separator, "a part without a blank line after its headers"
        lines = head.decode("ascii").split("\r\n")[1:]  # [0]: the rest of the delimiter line (empty)
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        parts.append((headers, content))
    return parts


def _handler(receiver: StowReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
            body = self._read_chunked() if chunked else self.rfile.read(int(self.headers.get("Content-Length", 0)))
            receiver.requests.append(StowRequest(self.path, dict(self.headers.items()), body, chunked))
            references = []
            for _, content in multipart_parts(self.headers["Content-Type"], body):
                dataset = pydicom.dcmread(io.BytesIO(content), stop_before_pixels=True)
                references.append(
                    {
                        "00081150": {"vr": "UI", "Value": [dataset.SOPClassUID]},
                        "00081155": {"vr": "UI", "Value": [dataset.SOPInstanceUID]},
                    }
                )
            answer = {"00081199": {"vr": "SQ", "Value": references[receiver.missing :]}}
            data = json.dumps(answer).encode()
            self.send_response(receiver.status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _read_chunked(self) -> bytes:
            body = bytearray()
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()  # the CRLF after each chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailer fields, if any
                pass
            return bytes(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: pytest shows what the assertions say."""

    return Handler


@contextlib.contextmanager
def stow_receiver() -> Iterator[StowReceiver]:
    port = free_port()
    receiver = StowReceiver(url=f"http://127.0.0.1:{port}/dicomweb/")
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(receiver))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def stowed_uids(request: StowRequest) -> list[str]:
    parts = multipart_parts(request.headers["Content-Type"], request.body)
    assert all(headers["content-type"] == "application/dicom" for headers, _ in parts)
    assert all(int(headers["content-length"]) == len(content) for headers, content in parts)
    return sorted(pydicom.dcmread(io.BytesIO(content)).SOPInstanceUID for _, content in parts)


def test_stow_rs_push_to_a_dicomweb_server(tmp_path: Path) -> None:
    files = one_study()
    uids = sorted(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID for data in files)
    with stow_receiver() as receiver:
        servers = {
            "c2p": receiver.url,
            "c2p-unchunked": {"Url": receiver.url, "ChunkedTransfers": False},
        }
        with running_orthanc(tmp_path, servers) as orthanc:
            answers = [orthanc.upload(data) for data in files]
            study = answers[0]["ParentStudy"]

            result = orthanc.stow_to("c2p", [study])
            assert result["InstancesCount"] == "3"
            # One POST for the whole study (both series) to {url}studies, chunked, the type parameter quoted.
            [request] = receiver.requests
            assert request.path == "/dicomweb/studies"
            assert request.chunked
            assert request.headers["Accept"] == "application/dicom+json"
            content_type = request.headers["Content-Type"]
            assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
            message = Message()
            message["Content-Type"] = content_type
            assert message.get_content_type() == "multipart/related"
            assert message.get_param("type") == "application/dicom"
            assert request.body.startswith(b"--" + str(message.get_param("boundary")).encode() + b"\r\n")
            assert stowed_uids(request) == uids
            # The parts are the stored files as they are.
            assert sorted(content for _, content in multipart_parts(content_type, request.body)) == sorted(files)

            # Without chunked transfers: the same body with a Content-Length.
            receiver.requests.clear()
            orthanc.stow_to("c2p-unchunked", [answers[0]["ID"]])
            [request] = receiver.requests
            assert not request.chunked
            assert int(request.headers["Content-Length"]) == len(request.body)
            assert stowed_uids(request) == [pydicom.dcmread(io.BytesIO(files[0])).SOPInstanceUID]

            # 202 with every instance referenced is a success for Orthanc.
            receiver.requests.clear()
            receiver.status = 202
            orthanc.stow_to("c2p", [answers[1]["ParentSeries"]])
            assert len(receiver.requests) == 1

            # A refusal fails the push: no retry, and the reason only in Orthanc's log (which the error carries).
            receiver.requests.clear()
            receiver.status = 409
            with pytest.raises(OrthancError, match="409") as refused:
                orthanc.stow_to("c2p", [study])
            assert refused.value.status == 500
            assert len(receiver.requests) == 1

            # A 200 that references fewer instances than were sent is a failure too.
            receiver.status, receiver.missing = 200, 1
            with pytest.raises(OrthancError, match="only able to receive 2 instances out of 3"):
                orthanc.stow_to("c2p", [study])


def test_a_failed_start_fails_the_test_with_orthancs_log(tmp_path: Path) -> None:
    (tmp_path / "not-a-directory").write_text("")
    broken = {"StorageDirectory": str(tmp_path / "not-a-directory" / "storage")}
    with (
        pytest.raises(pytest.fail.Exception, match="Not a directory"),
        running_orthanc(tmp_path, None, config_overrides=broken),
    ):
        pytest.fail("Orthanc started on a storage directory it cannot create")


def test_each_orthanc_is_private(tmp_path: Path) -> None:
    """Two at once (as parallel tests would have): own ports, own storage, nothing shared."""
    ct_path = get_testdata_file("CT_small.dcm")
    assert ct_path is not None
    with running_orthanc(tmp_path / "a") as first, running_orthanc(tmp_path / "b") as second:
        assert isinstance(first, Orthanc)
        assert first.url != second.url
        assert first.dicomweb_url == f"{first.url}/dicom-web"
        first.upload(Path(ct_path).read_bytes())
        assert len(first.get("/instances")) == 1
        assert second.get("/instances") == []
        assert first.storage.is_relative_to(tmp_path / "a")
