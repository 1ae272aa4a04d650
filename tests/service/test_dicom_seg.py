"""The DICOM SEG writer on real headers: pydicom's CT, ultrasound and secondary-capture test files, and nibabel's
Philips enhanced MR (a real multi-frame source whose geometry is in per-frame functional groups only). Each SEG is
read back with highdicom (frames, pixels, references, geometry, reliability) and validated with dciodvfy.

dciodvfy comes from Debian's dicom3tools; ``dciodvfy_errors`` skips the calling test, saying so, where it is not
installed, so a missing validator never reads as a pass. Other SEG tests import it from here.
"""

from __future__ import annotations

import copy
import gzip
import io
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import highdicom as hd
import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from service.errors import InvalidImage, InvalidRequest
from service.outputs.dicom_headers import decode_headers, encode_headers, header_only
from service.outputs.dicom_seg import (
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    PRIVATE_LEVEL,
    PRIVATE_SCORE,
    PRIVATE_SLICE_LEVEL,
    PRIVATE_SLICE_OUTLIER,
    PRIVATE_SLICE_SCORE,
    PRIVATE_SLICES,
    dicom_seg,
)
from service.schema import (
    InputInfo,
    Mask,
    ModelInfo,
    Preprocessing,
    Reliability,
    SegmentationResult,
    SliceReliability,
    Timings,
)

PHILIPS_ENHANCED_MR = Path(nibabel.__file__).parent / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz"
MODEL = ModelInfo(name="c2p-femto-192", version="abcd1234", digest="0123456789abcdef" * 4, engine="onnx")


# ------------------------------------------------------------------------------------------------ helpers


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's complaints about a DICOM file that are errors: lines that start with "Error" (or carry
    " - Error - " after an element's name), "Abort" lines, and a failing exit status without either. Warnings are
    printed, for the test log, not returned. Skips the calling test when dciodvfy is not installed."""
    executable = shutil.which("dciodvfy")
    if executable is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools): the DICOM SEG cannot be validated")
    run = subprocess.run([executable, str(path)], capture_output=True, text=True, timeout=120, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    for line in lines:
        if "Warning" in line:
            print(f"dciodvfy {path.name}: {line}")
    errors = [line for line in lines if line.startswith(("Error", "Abort")) or " - Error - " in line]
    if run.returncode != 0 and not errors:
        errors.append(f"dciodvfy exited with status {run.returncode}")
    return errors


def read(name: str) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test files' own header quirks
        return pydicom.dcmread(get_testdata_file(name))  # type: ignore[arg-type]


def stored(headers: list[Dataset]) -> list[Dataset]:
    """Headers as the worker has them when it builds a SEG: through Redis and back."""
    return decode_headers(encode_headers(headers))


def ct_series(count: int, rows: int | None = None) -> list[Dataset]:
    """CT_small.dcm as a series: one SeriesInstanceUID, own SOPInstanceUIDs, positions 2.5 mm apart along the slice
    normal. ``rows`` enlarges the declared image (headers only: a SEG never needs the source's pixels)."""
    template = read("CT_small.dcm")
    orientation = np.asarray([float(v) for v in template.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.asarray([float(v) for v in template.ImagePositionPatient])
    series_uid = generate_uid()
    headers = []
    for k in range(count):
        ds = header_only(template)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + 2.5 * k * normal]
        if rows is not None:
            ds.Rows = ds.Columns = rows
        headers.append(ds)
    return headers


def disc(rows: int, columns: int, centre: tuple[int, int], radius: int) -> np.ndarray:
    y, x = np.ogrid[:rows, :columns]
    return ((y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2).astype(np.uint8)


def make_result(depth: int, score: float = 0.83, level: str = "high") -> SegmentationResult:
    slices = [
        SliceReliability(
            index=z,
            score=round(0.3 + 0.6 * z / max(depth - 1, 1), 4),
            level="low" if z < depth / 3 else "medium" if z < 2 * depth / 3 else "high",
            suppressed=False,
            outlier=z == 1,
            agreement=0.9,
            consistency=0.8,
            geometry_agreement=0.7,
            view_weights=(0.9, 0.85, 0.8),
            view_inconsistency=(0.02, 0.03, 0.04),
            geometry_predicted={"area": 0.01},
            geometry_measured={"area": 0.01},
        )
        for z in range(depth)
    ]
    return SegmentationResult(
        model=MODEL,
        input=InputInfo(
            format="dicom",
            modality="CT",
            shape=(depth, 1, 1),
            preprocessing=Preprocessing(method="ct-window", window=(40, 400), input_size=192),
        ),
        mask=Mask(size=(1, 1), slices=[]),
        reliability=Reliability(score=score, level=level, suppressed=False, outlier_slices=[1], slices=slices),  # type: ignore[arg-type]
        timings=Timings(),
    )


def written(tmp_path: Path, blob: bytes, name: str) -> hd.seg.Segmentation:
    """The SEG as a file (for dciodvfy), read back with highdicom."""
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(blob)
    return hd.seg.segread(path)


def assert_valid(tmp_path: Path) -> None:
    """dciodvfy on every SEG a test wrote. Called last, so a test's own checks have run (and failed loudly) before
    a missing dciodvfy turns the test into a skip."""
    paths = sorted(tmp_path.glob("*.dcm"))
    assert paths
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name


def frame_sources(seg: hd.seg.Segmentation) -> list[tuple[str, int | None]]:
    out = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = source.get("ReferencedFrameNumber")
        out.append((str(source.ReferencedSOPInstanceUID), int(frame) if frame is not None else None))
    return out


def check_reliability_text(seg: hd.seg.Segmentation) -> None:
    assert "c2p reliability 0.83 (high)" in seg.SeriesDescription
    assert seg.ContentDescription == "RESEARCH USE ONLY; c2p reliability 0.83 (high)"
    assert seg.SeriesDescription.startswith("RESEARCH USE ONLY")
    description = seg.SegmentSequence[0].SegmentDescription
    assert "c2p reliability 0.83 (high)" in description and "outlier slices 1" in description
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "c2p-femto-192" and algorithm.AlgorithmVersion == "abcd1234"
    assert algorithm.AlgorithmSource == "c2p-serve"
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"


def private_slices(seg: Dataset) -> list[Dataset]:
    block = seg.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert block[PRIVATE_SCORE].value == pytest.approx(0.83)
    assert block[PRIVATE_LEVEL].value == "high"
    return list(block[PRIVATE_SLICES].value)


# ---------------------------------------------------------------------------------------- single-frame series


def test_ct_series_frames_pixels_references_and_geometry(tmp_path: Path) -> None:
    """Headers arrive in another order than the slices; frames exist only where the mask is not empty, each over
    its own source instance at that instance's position."""
    series = ct_series(6)
    header_order = [3, 0, 5, 1, 4, 2]  # header k is series slice header_order[k]
    headers = stored([series[k] for k in header_order])
    slices = [(header_order.index(z), None) for z in range(6)]
    masks = np.zeros((6, 128, 128), np.uint8)
    masks[1] = disc(128, 128, (40, 50), 12)
    masks[2] = disc(128, 128, (64, 64), 30)
    masks[4] = disc(128, 128, (90, 70), 8)
    before = [copy.deepcopy(ds) for ds in headers]

    seg = written(tmp_path, dicom_seg(headers, masks, slices, make_result(6)), "ct")

    assert headers == before  # the sources are read, never changed
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY" and seg.SeriesNumber == 9901
    assert seg.NumberOfFrames == 3
    uid_of = [str(series[z].SOPInstanceUID) for z in range(6)]
    assert sorted(frame_sources(seg)) == sorted((uid_of[z], None) for z in (1, 2, 4))
    pixels = seg.get_pixels_by_source_instance(uid_of, assert_missing_frames_are_empty=True)
    assert pixels.shape == (6, 128, 128, 1)
    assert np.array_equal(pixels[..., 0], masks)

    source = series[0]
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.SeriesInstanceUID != source.SeriesInstanceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [float(v) for v in source.PixelSpacing]
    )
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == pytest.approx(
        [float(v) for v in source.ImageOrientationPatient]
    )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series}
    for item, (uid, _) in zip(seg.PerFrameFunctionalGroupsSequence, frame_sources(seg), strict=True):
        assert [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
            [float(v) for v in by_uid[uid].ImagePositionPatient]
        )
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert {str(item.ReferencedSOPInstanceUID) for item in referenced.ReferencedInstanceSequence} == set(uid_of)

    check_reliability_text(seg)
    comments = {
        uid: item.FrameContentSequence[0].FrameComments
        for item, (uid, _) in zip(seg.PerFrameFunctionalGroupsSequence, frame_sources(seg), strict=True)
    }
    assert comments[uid_of[1]] == "c2p reliability 0.42 (low), outlier"
    assert comments[uid_of[4]] == "c2p reliability 0.78 (high)"
    items = private_slices(seg)
    assert [str(item.ReferencedSOPInstanceUID) for item in items] == uid_of
    assert all("ReferencedFrameNumber" not in item for item in items)
    scores = [item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[PRIVATE_SLICE_SCORE].value for item in items]
    assert scores == pytest.approx([0.3 + 0.6 * z / 5 for z in range(6)])
    first = items[1].private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert first[PRIVATE_SLICE_LEVEL].value == "low" and first[PRIVATE_SLICE_OUTLIER].value == "YES"
    assert_valid(tmp_path)


def test_empty_mask_gives_one_empty_frame(tmp_path: Path) -> None:
    """Nothing found is still a result a PACS user should see: one empty frame on the first slice, the whole
    series referenced, the reliability recorded (highdicom alone would write every slice as an empty frame)."""
    series = ct_series(5)
    masks = np.zeros((5, 128, 128), np.uint8)
    seg = written(tmp_path, dicom_seg(series, masks, [(z, None) for z in range(5)], make_result(5)), "empty")
    assert seg.NumberOfFrames == 1
    assert frame_sources(seg) == [(str(series[0].SOPInstanceUID), None)]
    assert not seg.get_pixels_by_source_instance([str(series[0].SOPInstanceUID)]).any()
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 5
    check_reliability_text(seg)
    assert "foreground on 0 of 5 slices" in seg.SegmentSequence[0].SegmentDescription
    assert len(private_slices(seg)) == 5
    assert_valid(tmp_path)


def test_nearly_equal_orientations_are_accepted(tmp_path: Path) -> None:
    """The reader sorted the series with a tolerance on ImageOrientationPatient; highdicom wants exact equality, so
    near-equal values are aligned in the SEG's working copies, not in the caller's headers."""
    series = ct_series(3)
    tilted = [float(v) for v in series[2].ImageOrientationPatient]
    tilted[0] -= 1e-6
    series[2].ImageOrientationPatient = tilted
    masks = np.stack([disc(128, 128, (60, 60), 10)] * 3)
    seg = written(tmp_path, dicom_seg(series, masks, [(z, None) for z in range(3)], make_result(3)), "iop")
    assert seg.NumberOfFrames == 3
    assert float(series[2].ImageOrientationPatient[0]) == pytest.approx(1 - 1e-6)
    assert_valid(tmp_path)


def test_missing_slice_thickness_comes_from_the_spacing(tmp_path: Path) -> None:
    """The SEG's pixel measures need a SliceThickness wherever there is a frame of reference; a series without one
    gets its slice spacing."""
    series = ct_series(3)
    for ds in series:
        del ds.SliceThickness
    masks = np.stack([disc(128, 128, (60, 60), 10)] * 3)
    seg = written(tmp_path, dicom_seg(series, masks, [(z, None) for z in range(3)], make_result(3)), "thickness")
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == pytest.approx(2.5)
    assert "SliceThickness" not in series[0]
    assert_valid(tmp_path)


def test_large_volume_is_built_quickly(tmp_path: Path) -> None:
    """512 x 512 x 300 with a mask on 60 slices, as a large CT: a few seconds at most (well under one here)."""
    series = ct_series(300, rows=512)
    masks = np.zeros((300, 512, 512), np.uint8)
    masks[100:160] = disc(512, 512, (256, 200), 60)
    slices = [(z, None) for z in range(300)]
    result = make_result(300)
    started = time.perf_counter()
    blob = dicom_seg(series, masks, slices, result)
    elapsed = time.perf_counter() - started
    print(f"512x512x300, 60 slices with foreground: {elapsed:.2f} s, {len(blob) / 1e6:.1f} MB")
    assert elapsed < 10.0
    seg = written(tmp_path, blob, "large")
    assert seg.NumberOfFrames == 60
    assert_valid(tmp_path)


# ---------------------------------------------------------------------------------------------- multi-frame


@pytest.fixture(scope="module")
def enhanced_mr() -> Dataset:
    """The Philips enhanced MR with its pixels (23 MB), read once for the module."""
    if not PHILIPS_ENHANCED_MR.exists():
        pytest.skip(f"nibabel's Philips enhanced MR test file is not installed ({PHILIPS_ENHANCED_MR})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(gzip.decompress(PHILIPS_ENHANCED_MR.read_bytes())))


def test_enhanced_multiframe_source(tmp_path: Path, enhanced_mr: Dataset) -> None:
    """176 frames whose pixel spacing and orientation sit in per-frame groups only (highdicom reads only shared
    ones). The slices run against the frame order (this file's frames already ascend along the normal, as the
    reader sorts), so a SEG that paired mask slice z with frame z + 1 would fail."""
    header = stored([header_only(enhanced_mr)])[0]
    assert "PixelData" in enhanced_mr and "PixelData" not in header
    frames = header.PerFrameFunctionalGroupsSequence
    orientation = np.asarray([float(v) for v in frames[0].PlaneOrientationSequence[0].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.asarray([[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in frames])
    order = np.argsort(-(positions @ normal))  # descending along the normal
    assert np.array_equal(order, np.arange(len(frames))[::-1])
    slices = [(0, int(k) + 1) for k in order]
    rows, columns = int(header.Rows), int(header.Columns)
    masks = np.zeros((len(frames), rows, columns), np.uint8)
    for z, radius in ((20, 10), (21, 25), (90, 40), (150, 5)):
        masks[z] = disc(rows, columns, (128, 100 + z // 2), radius)

    seg = written(tmp_path, dicom_seg([header], masks, slices, make_result(len(frames))), "enhanced")

    assert "PixelMeasuresSequence" not in header.SharedFunctionalGroupsSequence[0]  # filled in a copy only
    assert seg.NumberOfFrames == 4
    uid = str(header.SOPInstanceUID)
    expected = {slices[z][1]: z for z in (20, 21, 90, 150)}
    assert sorted(frame_sources(seg)) == sorted((uid, frame) for frame in expected)
    for item, (_, frame) in zip(seg.PerFrameFunctionalGroupsSequence, frame_sources(seg), strict=True):
        source_position = frames[frame - 1].PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
            [float(v) for v in source_position]
        )
    pixels = seg.get_pixels_by_source_frame(uid, source_frame_numbers=sorted(expected))
    for k, frame in enumerate(sorted(expected)):
        assert np.array_equal(pixels[k, ..., 0], masks[expected[frame]])
    spacing = frames[0].PixelMeasuresSequence[0].PixelSpacing
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(v) for v in spacing]
    assert seg.FrameOfReferenceUID == header.FrameOfReferenceUID
    check_reliability_text(seg)
    items = private_slices(seg)
    assert [(str(i.ReferencedSOPInstanceUID), int(i.ReferencedFrameNumber)) for i in items] == [
        (uid, frame) for _, frame in slices
    ]
    assert_valid(tmp_path)


def test_frames_that_differ_in_spacing_are_refused(enhanced_mr: Dataset) -> None:
    header = header_only(enhanced_mr)
    frames = header.PerFrameFunctionalGroupsSequence
    frames[7].PixelMeasuresSequence[0].PixelSpacing = [2.0, 2.0]
    masks = np.zeros((len(frames), int(header.Rows), int(header.Columns)), np.uint8)
    masks[7, 5:9, 5:9] = 1
    with pytest.raises(InvalidRequest, match="frames differ in pixel spacing"):
        dicom_seg([header], masks, [(0, k + 1) for k in range(len(frames))], make_result(len(frames)))
    assert float(enhanced_mr.PerFrameFunctionalGroupsSequence[7].PixelMeasuresSequence[0].PixelSpacing[0]) == 1.0


def test_several_multiframe_instances_are_refused() -> None:
    first, second = header_only(read("SC_rgb_rle_2frame.dcm")), header_only(read("SC_rgb_rle_2frame.dcm"))
    second.SOPInstanceUID = generate_uid()
    masks = np.zeros((4, int(first.Rows), int(first.Columns)), np.uint8)
    with pytest.raises(InvalidRequest, match="2 multi-frame instances"):
        dicom_seg([first, second], masks, [(0, 1), (0, 2), (1, 1), (1, 2)], make_result(4))


# ------------------------------------------------------------------------------------ pictures without geometry


def test_rgb_ultrasound_without_plane_geometry(tmp_path: Path) -> None:
    """A single colour picture without a frame of reference: the SEG lines up with it by reference alone."""
    header = stored([header_only(read("examples_rgb_color.dcm"))])[0]
    assert "FrameOfReferenceUID" not in header and int(header.SamplesPerPixel) == 3
    rows, columns = int(header.Rows), int(header.Columns)
    masks = disc(rows, columns, (rows // 2, columns // 3), 40)[None]
    seg = written(tmp_path, dicom_seg([header], masks, [(0, None)], make_result(1)), "rgb")
    assert seg.NumberOfFrames == 1 and frame_sources(seg) == [(str(header.SOPInstanceUID), None)]
    assert "PlanePositionSequence" not in seg.PerFrameFunctionalGroupsSequence[0]
    assert np.array_equal(seg.get_pixels_by_source_instance([str(header.SOPInstanceUID)])[0, ..., 0], masks[0])
    check_reliability_text(seg)
    assert_valid(tmp_path)


def test_secondary_capture_with_one_declared_frame(tmp_path: Path) -> None:
    """NumberOfFrames = 1 in a single-frame IOD, as the reader reports it: (0, 1)."""
    header = header_only(read("SC_rgb_small_odd.dcm"))
    rows, columns = int(header.Rows), int(header.Columns)
    masks = np.zeros((1, rows, columns), np.uint8)
    masks[0, 1:4, 1:3] = 1
    seg = written(tmp_path, dicom_seg([header], masks, [(0, 1)], make_result(1)), "sc")
    assert np.array_equal(seg.get_pixels_by_source_instance([str(header.SOPInstanceUID)])[0, ..., 0], masks[0])
    assert_valid(tmp_path)


def test_big_endian_ultrasound_with_retired_time_format(tmp_path: Path) -> None:
    """ExplVR_BigEnd.dcm: big endian all the way through Redis, and StudyTime in the retired HH:MM:SS form that
    highdicom refuses; the SEG carries it as HHMMSS."""
    header = stored([header_only(read("ExplVR_BigEnd.dcm"))])[0]
    assert header.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRBigEndian and ":" in header.StudyTime
    rows, columns = int(header.Rows), int(header.Columns)
    masks = disc(rows, columns, (rows // 2, columns // 2), 30)[None]
    seg = written(tmp_path, dicom_seg([header], masks, [(0, None)], make_result(1)), "big-endian")
    assert seg.StudyTime == header.StudyTime.replace(":", "")
    assert np.array_equal(seg.get_pixels_by_source_instance([str(header.SOPInstanceUID)])[0, ..., 0], masks[0])
    assert_valid(tmp_path)


def test_cine_without_plane_geometry_is_refused() -> None:
    header = header_only(read("examples_ybr_color.dcm"))
    frames = int(header.NumberOfFrames)
    masks = np.zeros((frames, int(header.Rows), int(header.Columns)), np.uint8)
    masks[3, 10:20, 10:20] = 1
    with pytest.raises(InvalidRequest, match="without plane geometry"):
        dicom_seg([header], masks, [(0, f + 1) for f in range(frames)], make_result(frames))


def test_arguments_that_contradict_each_other() -> None:
    series = ct_series(2)
    with pytest.raises(ValueError, match="3 slice references for 2 mask slices"):
        dicom_seg(series, np.zeros((2, 128, 128), np.uint8), [(0, None), (1, None), (1, None)], make_result(2))
    with pytest.raises(ValueError, match="masks are 64 x 64"):
        dicom_seg(series, np.zeros((2, 64, 64), np.uint8), [(0, None), (1, None)], make_result(2))


# ------------------------------------------------------------------------------------------------ headers


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small_padded.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "image_dfl.dcm"],
)  # explicit and implicit VR, big endian, deflated, trailing padding
def test_header_round_trip(name: str) -> None:
    full = read(name)
    header = header_only(full)
    for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009, 0xFFFCFFFC):
        assert tag not in header
    assert "PixelData" in full  # the source keeps its pixels
    assert header.file_meta.TransferSyntaxUID == full.file_meta.TransferSyntaxUID
    header.PatientID = "changed"
    assert full.PatientID != "changed"  # a copy, not a view

    blob = encode_headers([header])[0]
    assert blob[128:132] == b"DICM"
    assert len(blob) < 16_000  # no pixels
    decoded = decode_headers([blob])[0]
    assert decoded.file_meta.TransferSyntaxUID == full.file_meta.TransferSyntaxUID
    assert decoded.SOPInstanceUID == full.SOPInstanceUID and decoded.PatientID == "changed"
    changed = {0x00100020, 0x7FE00010, 0xFFFCFFFC}  # PatientID, the pixels, the padding
    for element in full:
        if not element.tag.is_private and element.tag not in changed:
            assert decoded[element.tag].value == element.value, element.tag


def test_padding_is_dropped() -> None:
    full = read("MR_small_padded.dcm")
    assert 0xFFFCFFFC in full
    assert 0xFFFCFFFC not in decode_headers(encode_headers([header_only(full)]))[0]


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b"", "empty"),
        (b"not a dicom file at all" * 10, "not a readable"),
        (b"\0" * 128 + b"DICM" + b"\xff" * 64, "not a DICOM image header"),
    ],
    ids=["empty", "text", "junk-after-preamble"],
)
def test_undecodable_headers(blob: bytes, why: str) -> None:
    good = encode_headers([header_only(read("CT_small.dcm"))])[0]
    with pytest.raises(InvalidImage, match=f"stored DICOM header 2 of 2 (is )?{why}"):
        decode_headers([good, blob])


def test_truncated_and_headerless_blobs() -> None:
    good = encode_headers([header_only(read("CT_small.dcm"))])[0]
    with pytest.raises(InvalidImage, match=r"header 1 of 1 is not a (readable DICOM Part 10 file|DICOM image header)"):
        decode_headers([good[: len(good) // 2]])  # pydicom reads up to the cut, so what is missing tells
    with pytest.raises(InvalidImage, match="header 1 of 1 is not a readable DICOM Part 10 file"):
        decode_headers([good[132:]])  # a data set without preamble: only force=True would take it


def test_the_segment_is_coded_with_the_read_out_concept(tmp_path: Path) -> None:
    """A SEG's segment says what was segmented, in SNOMED CT from pydicom's dictionary; only an unknown concept
    falls back to the generic tissue code, labelled with the model's name. Every SEG says research use."""
    from models.concepts import code_of
    from service.schema import Code, ConceptInfo

    series = ct_series(2)
    masks = np.stack([disc(128, 128, (60, 60), 10)] * 2)
    codes = code_of("lesion on CT")
    named = make_result(2).model_copy(
        update={
            "concept": ConceptInfo(
                name="lesion on CT", code=Code(**codes["type"]), category=Code(**codes["category"]), similarity=0.8
            )
        }
    )
    seg = written(tmp_path, dicom_seg(series, masks, [(0, None), (1, None)], named), "named")
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "lesion on CT"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SCT Lesion
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # morphologically abnormal
    assert "RESEARCH USE ONLY" in segment.SegmentDescription and "lesion on CT" in segment.SegmentDescription
    assert seg.SeriesDescription.startswith("RESEARCH USE ONLY")
    unknown = written(tmp_path, dicom_seg(series, masks, [(0, None), (1, None)], make_result(2)), "unknown")
    segment = unknown.SegmentSequence[0]
    assert segment.SegmentLabel == MODEL.name
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # SCT Tissue
    assert_valid(tmp_path)


def test_the_same_request_gives_the_same_seg_uids() -> None:
    """(issue 20, item 6) UIDs derived from the sources, the model and the masks: a PACS that gets the SEG twice
    stores it once, and other content never reuses a UID."""
    series = ct_series(3)
    masks = np.stack([disc(128, 128, (64, 64), 10 + z) for z in range(3)])
    slices = [(z, None) for z in range(3)]

    def uids(masks: np.ndarray, result: SegmentationResult) -> tuple[str, str]:
        seg = pydicom.dcmread(io.BytesIO(dicom_seg(series, masks, slices, result)))
        assert str(seg.SeriesInstanceUID).startswith("2.25.") and seg.SeriesInstanceUID != seg.SOPInstanceUID
        return str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID)

    first = uids(masks, make_result(3))
    assert uids(masks, make_result(3)) == first
    other_mask = masks.copy()
    other_mask[1, 0, 0] = True
    assert uids(other_mask, make_result(3))[0] != first[0]
    other_model = make_result(3)
    other_model.model.digest = "f" * 64
    assert uids(masks, other_model)[0] != first[0]


def test_series_number_and_description_are_settings() -> None:
    """(issue 20, item 6) What a reader sees in the PACS's series list; RESEARCH USE ONLY always leads."""
    from service.config import SegSettings

    series = ct_series(2)
    masks = np.stack([disc(128, 128, (64, 64), 10) for _ in range(2)])
    seg = pydicom.dcmread(
        io.BytesIO(
            dicom_seg(series, masks, [(0, None), (1, None)], make_result(2), series_number=77, series_description="AI")
        )
    )
    assert (
        seg.SeriesNumber == 77
        and seg.SeriesDescription.startswith("RESEARCH USE ONLY")
        and "AI" in seg.SeriesDescription
    )
    assert SegSettings().series_number == 9901
