"""Patient names and IDs never leave the service except inside the DICOM SEG that belongs to the patient: not in
logs, metrics, error messages, job JSON, NIfTI or PNG results, whether the study segments or fails."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import pydicom
import pytest

from service.config import QueueSettings
from tests.service.harness import engine_for, make_settings, running
from tests.service.test_inputs import ct_series
from tests.service.test_service import upload

NAME = "Smithers^Waylon^Q"
PATIENT_ID = "MRN-5551234-ZZ"
BIRTH_DATE = "19310405"
ACCESSION = "ACC-889977"
IDENTIFIERS = (NAME, "Smithers", "Waylon", PATIENT_ID, "5551234", BIRTH_DATE, ACCESSION)


def identified_series() -> list[tuple[str, bytes]]:
    files = []
    for name, data in ct_series()[0]:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = NAME, PATIENT_ID, BIRTH_DATE, ACCESSION
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append((f"{PATIENT_ID}-{name}", buffer.getvalue()))  # the file name carries an identifier too
    return files


def test_identifiers_reach_no_log_metric_message_or_result(
    redis_url: str,
    queue_settings: QueueSettings,
    exported: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(redis_url, queue_settings, exported)
    files = identified_series()
    broken = [(name, data[: len(data) // 2]) for name, data in files]  # pixel data cut: the worker refuses it
    huge = pydicom.dcmread(io.BytesIO(files[1][1]))
    huge.Rows = huge.Columns = 60000  # refused at the gateway, from the header
    buffer = io.BytesIO()
    huge.save_as(buffer, enforce_file_format=True)
    too_large = [files[0], (files[1][0], buffer.getvalue())]
    written: list[str] = []

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            ok = await http.post("/v1/segmentations?wait=60", files=upload(*files))
            assert ok.status_code == 200, ok.text
            written.append(ok.text)
            base = f"/v1/segmentations/{ok.json()['id']}/result"
            for fmt in ("json", "nifti", "png"):
                answer = await http.get(base, params={"format": fmt})
                assert answer.status_code == 200
                written.append(answer.content.decode("latin-1"))
            seg = await http.get(base, params={"format": "dicom-seg"})
            assert pydicom.dcmread(io.BytesIO(seg.content)).PatientID == PATIENT_ID  # where it belongs
            for bad in (broken, too_large, [(f"{PATIENT_ID}.txt", NAME.encode())]):
                answer = await http.post("/v1/segmentations?wait=60", files=upload(*bad))
                assert 400 <= answer.status_code < 500, answer.text
                written.append(answer.text)
            written.append((await http.get("/metrics")).text)

    asyncio.run(scenario())
    out, err = capfd.readouterr()
    everything = "\n".join([*written, caplog.text, out, err])
    found = [identifier for identifier in IDENTIFIERS if identifier in everything]
    assert not found, f"identifiers leaked: {found}"
