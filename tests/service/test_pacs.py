"""A real PACS end to end: Orthanc pushes a CT study to our STOW-RS endpoint, the worker segments it and sends the
DICOM SEG back to Orthanc, which stores it beside the CT with the right references. Patient names and IDs never
reach the service's logs on the way."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from service.auth import entry_for, new_key
from service.config import DicomWebSettings, QueueSettings
from tests.service.harness import engine_for, free_port, make_settings, serving_http
from tests.service.orthanc import orthanc_available, running_orthanc
from tests.service.test_dicom_seg import dciodvfy_errors
from tests.service.test_inputs import ct_series

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
PATIENT_NAME = "Doe^Jane^Q"
PATIENT_ID = "PID-7781-XYZ"

pytestmark = pytest.mark.skipif(orthanc_available() is not None, reason=orthanc_available() or "")


def named_series() -> list[bytes]:
    """The 4-slice CT series with a patient name and ID the logs are then searched for."""
    out = []
    for _, data in ct_series()[0]:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


@pytest.mark.slow
def test_orthanc_study_goes_out_by_stow_rs_and_its_seg_comes_back(
    redis_url: str,
    queue_settings: QueueSettings,
    exported: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    series = named_series()
    ct = [pydicom.dcmread(io.BytesIO(data)) for data in series]
    study_uid = str(ct[0].StudyInstanceUID)
    # Orthanc authenticates as a tenant of its own, with an API key in its DicomWeb server's HttpHeaders.
    key = new_key()
    settings = make_settings(redis_url, queue_settings, exported).model_copy(
        update={"api_keys": entry_for("pacs", key)}
    )

    async def run() -> None:
        # Each side needs the other's URL: our port is chosen first, Orthanc starts pointing at it, then the
        # service starts with Orthanc as its destination.
        port = free_port()
        peer = {"Url": f"http://127.0.0.1:{port}/dicomweb/", "HttpHeaders": {"Authorization": f"Bearer {key}"}}
        with running_orthanc(tmp_path / "orthanc", {"c2p": peer}) as orthanc:
            settings.dicomweb = DicomWebSettings(
                destination_url=f"{orthanc.dicomweb_url}/", attempts=5, backoff_s=0.5, timeout_s=30
            )
            async with serving_http(settings, engine_for(exported), port):
                uploaded = [orthanc.upload(data) for data in series]
                study_id = uploaded[0]["ParentStudy"]
                await asyncio.to_thread(orthanc.stow_to, "c2p", [study_id])

                def seg_arrived() -> list[dict]:
                    return [i for i in orthanc.instances_of_study(study_uid) if i["SOPClassUID"] == SEG_CLASS]

                (seg_entry,) = await asyncio.to_thread(orthanc.wait_for, seg_arrived, 120)
                seg_bytes = orthanc.download(seg_entry["ID"])
                path = tmp_path / "from-orthanc.seg.dcm"
                path.write_bytes(seg_bytes)
                assert dciodvfy_errors(path) == []
                seg = hd.seg.segread(path)
                assert seg.StudyInstanceUID == study_uid
                assert seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
                assert seg.PatientID == PATIENT_ID  # the SEG belongs to the same patient in the PACS
                (referenced,) = seg.ReferencedSeriesSequence
                assert referenced.SeriesInstanceUID == ct[0].SeriesInstanceUID
                assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
                    str(ds.SOPInstanceUID) for ds in ct
                }
                assert seg.SeriesInstanceUID != ct[0].SeriesInstanceUID

    asyncio.run(run())
    out, err = capfd.readouterr()
    written = caplog.text + out + err
    for identifier in (PATIENT_NAME, PATIENT_ID, "Doe", "7781"):
        assert identifier not in written, f"{identifier!r} reached the logs"
    assert key not in written, "the API key reached the logs"
    assert '"action":"submit","api":"stow-rs","tenant":"pacs"' in caplog.text  # audited as Orthanc's tenant
