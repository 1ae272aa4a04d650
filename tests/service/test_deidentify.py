"""De-identification of the kept DICOM headers (worker.deidentify, PS3.15 basic profile, dicom-anonymizer's table).

Unit tests on pydicom's CT (identifiers set on purpose, private and nested elements added) and nibabel's Philips
enhanced MR (private groups and dates nested in per-frame functional groups): nothing identifying left, UIDs mapped
one way across the series, geometry unchanged, the SEG built from the result valid (highdicom, dciodvfy). Then the
service end to end: the SEG a caller downloads carries no identifier with the setting on and does with it off, and a
SEG forwarded to the source PACS keeps them while the download does not.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicomanonymizer import simpledicomanonymizer
from pydicom.dataset import Dataset

from service.config import DicomWebSettings, QueueSettings, Settings
from service.outputs import formats as outputs
from service.outputs.deidentify import DUMMY, METHOD, PATIENT_NAME, deidentify_series
from service.outputs.dicom_headers import encode_headers, header_only
from service.outputs.dicom_seg import dicom_seg
from tests.service.harness import engine_for, make_settings, running
from tests.service.test_dicom_seg import ct_series as ct_headers
from tests.service.test_dicom_seg import (
    dciodvfy_errors,
    disc,
    enhanced_mr,  # noqa: F401 (a fixture)
    frame_sources,
    make_result,
    stored,
    written,
)
from tests.service.test_dicomweb import (  # noqa: F401 (destination is a fixture)
    REFERENCED,
    RETRIEVE_URL,
    Destination,
    destination,
    items,
    related,
)
from tests.service.test_inputs import ct_series as ct_files
from tests.service.test_inputs import read
from tests.service.test_service import upload

NAME = "Smithers^Waylon^Q"
PATIENT_ID = "MRN-5551234-ZZ"
BIRTH_DATE = "19310405"
STUDY_DATE = "20240229"
ACCESSION = "ACC-889977"
INSTITUTION = "Springfield Nuclear Clinic"
REFERRER = "Hibbert^Julius"
OTHER_ID = "OTHER-4471"
IDENTIFIERS = (NAME, "Smithers", "Waylon", PATIENT_ID, "5551234", BIRTH_DATE, STUDY_DATE, ACCESSION, INSTITUTION)
IDENTIFIERS += (REFERRER, "Hibbert", OTHER_ID)
PRIVATE_GROUP = 0x0019
PRIVATE_CREATOR = "ACME SCANNER"


def identify(ds: Dataset) -> Dataset:
    """The identifiers on ``ds``, in top-level, private and nested places."""
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH_DATE
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = STUDY_DATE
    ds.AccessionNumber, ds.InstitutionName, ds.ReferringPhysicianName = ACCESSION, INSTITUTION, REFERRER
    ds.OtherPatientIDs = OTHER_ID
    ds.StudyID = "4471"
    ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(0x01, "LO", NAME)
    return ds


def identified_ct(count: int) -> list[Dataset]:
    """CT_small as a series with identifiers; each instance but the first references the first (Referenced Image
    Sequence, with a private element in the item)."""
    series = [identify(ds) for ds in ct_headers(count)]
    for ds in series[1:]:
        item = Dataset()
        item.ReferencedSOPClassUID = series[0].SOPClassUID
        item.ReferencedSOPInstanceUID = series[0].SOPInstanceUID
        item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(0x02, "LO", PATIENT_ID)
        ds.ReferencedImageSequence = [item]
    return series


def found(blob: bytes, *extra: str) -> list[str]:
    return [text for text in (*IDENTIFIERS, *extra) if text.encode() in blob]


def private_tags(ds: Dataset) -> list[int]:
    tags: list[int] = []
    ds.walk(lambda _, element: tags.append(element.tag) if element.tag.is_private else None)
    return tags


# ------------------------------------------------------------------------------------------------- headers


def test_identifiers_are_removed_and_the_method_recorded() -> None:
    series = identified_ct(3)
    before = encode_headers(series)
    out = deidentify_series(series)

    assert encode_headers(series) == before  # the caller's headers are not changed
    assert all(found(blob) for blob in before)
    for ds, blob in zip(out, encode_headers(out), strict=True):
        assert found(blob) == []
        assert ds.PatientName == PATIENT_NAME and ds.PatientID == DUMMY
        assert ds.PatientBirthDate == "" and ds.StudyDate == "" and ds.AccessionNumber == ""  # Z: zero length
        assert "OtherPatientIDs" not in ds and "StudyID" in ds and ds.StudyID == ""  # X, Z
        assert ds.SeriesDate == "19000101" and ds.ContentDate == "19000101"  # X/D, Z/D: a valid dummy
        assert private_tags(ds) == []
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod == METHOD
        code = ds.DeidentificationMethodCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("113100", "DCM", METHOD)


def test_uids_are_mapped_one_way_for_the_series_and_geometry_kept() -> None:
    series = identified_ct(4)
    out = deidentify_series(series)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({str(ds[keyword].value) for ds in out}) == 1, keyword
        assert out[0][keyword].value != series[0][keyword].value, keyword
    old = [str(ds.SOPInstanceUID) for ds in series]
    new = [str(ds.SOPInstanceUID) for ds in out]
    assert len(set(new)) == 4 and not set(new) & set(old)
    for ds in out:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == series[0].SOPClassUID
    for ds in out[1:]:  # references in items follow the instance they name
        (item,) = ds.ReferencedImageSequence
        assert item.ReferencedSOPInstanceUID == new[0] and item.ReferencedSOPClassUID == series[0].SOPClassUID
    for before, after in zip(series, out, strict=True):
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
            assert after[keyword].value == before[keyword].value, keyword
        assert (after.Rows, after.Columns) == (before.Rows, before.Columns)

    again = deidentify_series(series)  # another job: another mapping, nothing linking the two
    assert again[0].StudyInstanceUID != out[0].StudyInstanceUID
    assert not {str(ds.SOPInstanceUID) for ds in again} & set(new)
    assert not set(simpledicomanonymizer.dictionary) & set(old)  # the library's global dictionary holds none


def test_uids_differ_from_the_original_at_every_level() -> None:
    """No original UID survives anywhere in a de-identified header, file meta included (the SOP Class and transfer
    syntax, which name no one, aside)."""
    series = identified_ct(3)
    keep = {str(series[0].SOPClassUID), str(series[0].file_meta.TransferSyntaxUID)}
    keep.add(str(series[0].file_meta.get("ImplementationClassUID", "")))
    old: set[str] = set()
    for ds in series:
        ds.walk(lambda _, e: old.add(str(e.value)) if e.VR == "UI" and str(e.value) not in keep else None)
        old.add(str(ds.file_meta.MediaStorageSOPInstanceUID))
    for blob in encode_headers(deidentify_series(series)):
        assert [uid for uid in old if uid.encode() in blob] == []


def test_seg_from_deidentified_ct_is_valid_and_carries_no_identifier(tmp_path: Path) -> None:
    series = identified_ct(6)
    out = deidentify_series(series)
    masks = np.zeros((6, 128, 128), np.uint8)
    masks[2] = disc(128, 128, (64, 64), 30)
    masks[3] = disc(128, 128, (60, 70), 20)
    blob = dicom_seg(stored(out), masks, [(z, None) for z in range(6)], make_result(6))

    originals = [str(series[0][k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")]
    assert found(blob, *originals, *(str(ds.SOPInstanceUID) for ds in series)) == []
    seg = written(tmp_path, blob, "deidentified-ct")
    assert seg.PatientName == PATIENT_NAME and seg.PatientID == DUMMY and seg.PatientIdentityRemoved == "YES"
    assert seg.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert seg.StudyInstanceUID == out[0].StudyInstanceUID and seg.FrameOfReferenceUID == out[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == out[0].SeriesInstanceUID
    new = [str(ds.SOPInstanceUID) for ds in out]
    assert sorted(frame_sources(seg)) == sorted((new[z], None) for z in (2, 3))
    pixels = seg.get_pixels_by_source_instance(new, assert_missing_frames_are_empty=True)
    assert np.array_equal(pixels[..., 0], masks)
    for item, (uid, _) in zip(seg.PerFrameFunctionalGroupsSequence, frame_sources(seg), strict=True):
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == [float(v) for v in series[new.index(uid)].ImagePositionPatient]
    assert dciodvfy_errors(tmp_path / "deidentified-ct.dcm") == []


def test_enhanced_multiframe_source_nested_dates_and_private_groups(
    tmp_path: Path,
    enhanced_mr: Dataset,  # noqa: F811
) -> None:
    """The Philips enhanced MR: 195 private elements at the top, more in every frame's groups, and a
    FrameAcquisitionDateTime in each frame's Frame Content (the table's D, inside a sequence)."""
    header = identify(header_only(enhanced_mr))
    acquired = str(header.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0].FrameAcquisitionDateTime)
    started = time.perf_counter()
    (out,) = deidentify_series([header])
    print(f"enhanced MR, {len(header.PerFrameFunctionalGroupsSequence)} frames: {time.perf_counter() - started:.2f} s")

    assert private_tags(header) and private_tags(out) == []
    frames = out.PerFrameFunctionalGroupsSequence
    for frame in frames:
        content = frame.FrameContentSequence[0]
        assert str(content.FrameAcquisitionDateTime).startswith("1900")
        assert str(content.FrameReferenceDateTime).startswith("1900")
    organization = out.DimensionOrganizationSequence[0].DimensionOrganizationUID
    assert organization != header.DimensionOrganizationSequence[0].DimensionOrganizationUID
    assert {str(item.DimensionOrganizationUID) for item in out.DimensionIndexSequence} == {str(organization)}
    assert found(encode_headers([out])[0], acquired[:8], "University of Washington") == []

    rows, columns = int(out.Rows), int(out.Columns)
    masks = np.zeros((len(frames), rows, columns), np.uint8)
    masks[20] = disc(rows, columns, (128, 110), 20)
    blob = dicom_seg(stored([out]), masks, [(0, k + 1) for k in range(len(frames))], make_result(len(frames)))
    assert found(blob, acquired[:8], str(header.StudyInstanceUID), str(header.SOPInstanceUID)) == []
    seg = written(tmp_path, blob, "deidentified-mr")
    assert frame_sources(seg) == [(str(out.SOPInstanceUID), 21)]
    shared = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    source = header.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in shared] == [float(v) for v in source]
    assert dciodvfy_errors(tmp_path / "deidentified-mr.dcm") == []


# ------------------------------------------------------------------------------------------- kept outputs


def identified_files(count: int = 4) -> list[tuple[str, bytes]]:
    files = []
    for name, data in ct_files(count)[0]:
        ds = identify(pydicom.dcmread(io.BytesIO(data)))
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append((name, buffer.getvalue()))
    return files


def test_kept_members_deidentified_in_place_of_the_headers() -> None:
    _, volume = read(identified_files())
    result = make_result(volume.shape[0])
    members = outputs.kept_members(volume, result)
    out = outputs.deidentified(members, volume)

    assert [name for name, _ in out] == [name for name, _ in members]
    original, changed = dict(members), dict(out)
    assert changed[outputs.INDEX] == original[outputs.INDEX]  # the slice map holds
    for name, blob in out:
        if name.startswith("preview/"):
            assert blob == original[name]
        if name.startswith("dicom/"):
            assert found(original[name]) and found(blob) == []
    assert outputs.deidentified(outputs.kept_members(volume, result), volume) != out  # a new mapping each job


def test_headers_that_cannot_be_deidentified_are_not_kept(caplog: pytest.LogCaptureFixture) -> None:
    """Fails closed: an attribute the library cannot replace (an AT value in a sequence the table replaces) drops
    the headers, and the SEG is unavailable rather than identified."""
    files = identified_files()
    ds = pydicom.dcmread(io.BytesIO(files[0][1]))
    item = Dataset()
    item.add_new(0x00209165, "AT", 0x00200032)  # Dimension Index Pointer
    ds.ContentSequence = [item]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    _, volume = read([(files[0][0], buffer.getvalue()), *files[1:]])
    out = outputs.deidentified(outputs.kept_members(volume, make_result(volume.shape[0])), volume)

    assert not [name for name, _ in out if name.startswith("dicom/")]
    assert json.loads(dict(out)[outputs.INDEX])["dicom"] == {"error": "the source headers could not be de-identified"}
    assert all(found(blob) == [] for _, blob in out)
    assert "cannot be de-identified (NotImplementedError)" in caplog.text and NAME not in caplog.text


def test_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().worker.deidentify is False
    monkeypatch.setenv("C2P_WORKER__DEIDENTIFY", "true")
    assert Settings().worker.deidentify is True


# -------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("deidentify", [True, False], ids=["deidentify", "default"])
def test_downloaded_seg(
    redis_url: str, queue_settings: QueueSettings, exported: Path, tmp_path: Path, deidentify: bool
) -> None:
    settings = make_settings(redis_url, queue_settings, exported, deidentify=deidentify)
    files = identified_files()
    study = str(pydicom.dcmread(io.BytesIO(files[0][1])).StudyInstanceUID)
    answers: dict[str, bytes] = {}

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            ok = await http.post("/v1/segmentations?wait=60", files=upload(*files))
            assert ok.status_code == 200, ok.text
            base = f"/v1/segmentations/{ok.json()['id']}/result"
            for fmt in ("dicom-seg", "png", "json"):
                answer = await http.get(base, params={"format": fmt})
                assert answer.status_code == 200, answer.text
                answers[fmt] = answer.content

    asyncio.run(scenario())
    blob = answers["dicom-seg"]
    seg = written(tmp_path, blob, "downloaded")
    if deidentify:
        assert found(blob, study) == []
        assert seg.PatientIdentityRemoved == "YES" and seg.PatientID == DUMMY
        assert seg.StudyInstanceUID != study
    else:  # the default is unchanged: the SEG belongs to the patient
        assert PATIENT_ID in found(blob) and NAME in found(blob) and study in found(blob, study)
        assert seg.PatientID == PATIENT_ID and "PatientIdentityRemoved" not in seg
    assert seg.NumberOfFrames >= 1 and answers["png"].startswith(b"\x89PNG")
    assert dciodvfy_errors(tmp_path / "downloaded.dcm") == []


def test_forwarded_seg_keeps_identifiers_the_download_has_not(
    redis_url: str,
    queue_settings: QueueSettings,
    exported: Path,
    destination: tuple[str, type[Destination]],  # noqa: F811
    tmp_path: Path,
) -> None:
    url, handler = destination
    settings = make_settings(redis_url, queue_settings, exported, deidentify=True)
    settings.dicomweb = DicomWebSettings(destination_url=url, attempts=1, backoff_s=0.05, timeout_s=10)
    files = [data for _, data in identified_files()]
    study = str(pydicom.dcmread(io.BytesIO(files[0])).StudyInstanceUID)
    downloaded: list[bytes] = []

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            body, content_type = related(*files)
            answer = await http.post("/dicomweb/studies", content=body, headers={"content-type": content_type})
            job_url = items(answer.json(), REFERENCED)[0][RETRIEVE_URL]["Value"][0].removeprefix("http://c2p.test")
            for _ in range(600):
                job = (await http.get(job_url)).json()
                if job.get("forwarding") and job["forwarding"]["status"] != "pending":
                    break
                await asyncio.sleep(0.05)
            assert job["forwarding"]["status"] == "sent", job
            seg = await http.get(f"{job_url}/result", params={"format": "dicom-seg"})
            assert seg.status_code == 200, seg.text
            downloaded.append(seg.content)

    asyncio.run(scenario())
    part = handler.received[-1].split(b"\r\n\r\n", 1)[1]
    forwarded = part[: part.rindex(b"\r\n--")]
    sent = pydicom.dcmread(io.BytesIO(forwarded))
    assert sent.PatientID == PATIENT_ID and sent.StudyInstanceUID == study  # matches the patient in the PACS
    assert "PatientIdentityRemoved" not in sent
    assert found(downloaded[0], study) == []
    mine = hd.seg.segread(io.BytesIO(downloaded[0]))
    assert mine.PatientIdentityRemoved == "YES" and mine.StudyInstanceUID != study
    (tmp_path / "forwarded.dcm").write_bytes(forwarded)
    assert dciodvfy_errors(tmp_path / "forwarded.dcm") == []
