"""Input readers on real files: pydicom's own test data (every transfer syntax it ships), NIfTI built with nibabel,
pictures from Pillow and scikit-image. Everything is made in memory; nothing is downloaded."""

from __future__ import annotations

import copy
import gzip
import io
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from service.config import LimitSettings
from service.errors import (
    ImageTooLarge,
    InvalidImage,
    PayloadTooLarge,
    ServiceError,
    UnsupportedFormat,
    UnsupportedTransferSyntax,
)
from service.inputs import InputHeader, Volume, decode, probe

# The expansion ratio is checked from the first byte here, so bombs of a few MB show the check; the service's
# default only checks past 64 MiB decoded (a blank image compresses far better than 200:1): the test below.
LIMITS = LimitSettings(expansion_floor_bytes=0)
MIB = 1 << 20


def sample_path(name: str) -> Path:
    return Path(get_testdata_file(name))  # type: ignore[arg-type]


def raw(name: str) -> bytes:
    return sample_path(name).read_bytes()


def dataset(name: str) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(sample_path(name))


def to_bytes(ds: Dataset, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, **kwargs)  # type: ignore[arg-type]
    return buffer.getvalue()


def read(files: list[tuple[str, bytes]], limits: LimitSettings = LIMITS, hint: str | None = None):
    """probe then decode, as gateway and worker do; the header must announce what decode delivers."""
    header = probe(files, limits, hint)
    volume = decode(files, limits, hint)
    assert isinstance(header, InputHeader) and isinstance(volume, Volume)
    assert header.shape == volume.shape
    assert header.channels == volume.channels
    assert header.format == volume.format
    assert header.modality == volume.modality
    assert volume.pixels.flags.writeable and volume.pixels.flags.c_contiguous
    if volume.channels == 3:
        assert volume.pixels.dtype == np.uint8 and volume.pixels.shape[-1] == 3
    else:
        assert volume.pixels.dtype in (np.uint8, np.int16, np.uint16, np.float32)
        assert np.isfinite(volume.pixels).all()
    return header, volume


def refused(files: list[tuple[str, bytes]], error: type[ServiceError], limits: LimitSettings = LIMITS) -> str:
    """Both entry points refuse with ``error``; returns the message."""
    with pytest.raises(error) as by_probe:
        probe(files, limits)
    with pytest.raises(error) as by_decode:
        decode(files, limits)
    assert 400 <= by_probe.value.http_status < 500
    assert by_probe.value.message == by_decode.value.message
    return by_probe.value.message


# ------------------------------------------------------------------------------------- pydicom's test files

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
# Listed directly: get_testdata_files("*") also tries to fetch pydicom-data's extra files from the network.
ALL_TEST_FILES = sorted(p for p in TEST_FILES.rglob("*") if p.is_file() and "TINY_ALPHA" not in p.parts)
NOT_IMAGES = {"SEG", "RTDOSE", "RTPLAN", "RTSTRUCT", "SR", "ECG"}


def pydicom_reference(path: Path) -> np.ndarray | None:
    """What pydicom alone makes of a file: its pixel array if it is an image pydicom decodes, else None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
            if ds.get("Modality") in NOT_IMAGES or "PixelData" not in ds:
                return None
            return ds.pixel_array
        except Exception:
            return None


@pytest.mark.parametrize("path", ALL_TEST_FILES, ids=lambda p: str(p.relative_to(TEST_FILES)))
def test_every_pydicom_test_file_decodes_or_is_refused_cleanly(path: Path) -> None:
    files = [(path.name, path.read_bytes())]
    expected = pydicom_reference(path)
    if expected is None:
        try:
            read(files)
        except ServiceError as exc:
            assert 400 <= exc.http_status < 500
        else:
            pytest.fail("decoded a file pydicom cannot decode")
        return
    _, volume = read(files)
    frames = expected if volume.pixels.shape[0] > 1 else expected[None]
    assert volume.pixels.shape[:3] == frames.shape[:3]
    ds = dataset(str(path.relative_to(TEST_FILES)))
    # pydicom's default decoder for JPEG is GDCM, ours pylibjpeg: lossy codecs may differ by an IDCT rounding.
    tolerance = 1.0 if ds.file_meta.TransferSyntaxUID.is_compressed else 1e-3
    if ds.PhotometricInterpretation == "MONOCHROME2":
        assert np.abs(volume.pixels - apply_modality_lut(frames, ds)).mean() < tolerance
    if ds.get("SamplesPerPixel") == 3 and ds.BitsAllocated == 8:
        assert np.abs(volume.pixels.astype(np.int16) - frames).mean() < tolerance


def test_ct_small_is_rescaled_into_int16_with_its_geometry() -> None:
    ds = dataset("CT_small.dcm")
    header, volume = read([("CT_small.dcm", raw("CT_small.dcm"))])
    assert header.transfer_syntax == "1.2.840.10008.1.2.1" and header.files == 1
    assert volume.modality == "CT" and volume.format == "dicom" and volume.photometric == "MONOCHROME2"
    assert volume.pixels.dtype == np.int16  # stored values are 16-bit signed, slope 1: no float copy
    expected = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    assert np.array_equal(volume.pixels[0], expected)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    assert volume.spacing == (float(ds.SliceThickness), dy, dx)
    assert volume.orientation == "LPS"
    iop = np.array(ds.ImageOrientationPatient, float)
    assert np.allclose(volume.affine[:3, 0], iop[:3] * dx) and np.allclose(volume.affine[:3, 1], iop[3:] * dy)
    assert np.allclose(volume.affine[:3, 3], np.array(ds.ImagePositionPatient, float))
    assert volume.source["series_uid"] == ds.SeriesInstanceUID
    assert volume.source["instances"] == [{"sop_instance_uid": ds.SOPInstanceUID, "header": 0, "frame": None}]
    (kept,) = volume.source["headers"]  # the header a DICOM SEG will copy, without its pixels
    assert kept.SOPInstanceUID == ds.SOPInstanceUID and "PixelData" not in kept
    assert "source" not in repr(volume) and ds.SOPInstanceUID not in repr(volume)


MR_SYNTAXES = [
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",  # explicit big endian
    "MR_small_expb.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "MR_small_padded.dcm",
]


@pytest.mark.parametrize("name", MR_SYNTAXES)
def test_lossless_transfer_syntaxes_agree_with_the_uncompressed_file(name: str) -> None:
    _, reference = read([("MR_small.dcm", raw("MR_small.dcm"))])
    header, volume = read([(name, raw(name))])
    assert volume.modality == "MR" and header.shape == (1, 64, 64)
    assert volume.pixels.dtype == reference.pixels.dtype and np.array_equal(volume.pixels, reference.pixels)
    assert volume.window == reference.window == (600.0, 1600.0)


def test_deflated_dataset() -> None:
    header, volume = read([("image_dfl.dcm", raw("image_dfl.dcm"))])
    assert header.transfer_syntax == DeflatedExplicitVRLittleEndian
    assert volume.pixels.shape == (1, 512, 512) and volume.pixels.dtype == np.uint8
    assert np.array_equal(volume.pixels[0], dataset("image_dfl.dcm").pixel_array)


def test_deflate_bomb_is_refused_before_pydicom_inflates_it() -> None:
    ds = dataset("MR_small.dcm")
    ds.add_new(0x00091010, "LO", "BOMB")
    ds.add_new(0x00091011, "OB", bytes(8 * MIB))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    data = to_bytes(ds)
    assert len(data) < 8 * MIB // 200
    message = refused([("bomb.dcm", data)], ImageTooLarge)
    assert "expands beyond" in message


RGB_FILES = [
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_16bit.dcm",  # 16-bit samples scaled to 8
    "SC_rgb_rle_32bit.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",  # JPEG baseline, RGB
    "SC_rgb_dcmtk_+eb+cy+n1.dcm",  # JPEG baseline, YBR_FULL
    "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG baseline, YBR_FULL_422
    "SC_rgb_dcmtk_+eb+cy+s2.dcm",
    "SC_rgb_jpeg_lossy_gdcm.dcm",
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless
    "SC_rgb_gdcm_KY.dcm",  # JPEG 2000
    "SC_rgb_jls_lossy_line.dcm",  # JPEG-LS near-lossless
    "SC_ybr_full_422_uncompressed.dcm",
]


@pytest.mark.parametrize("name", RGB_FILES)
def test_colour_in_every_syntax_comes_out_as_the_same_rgb(name: str) -> None:
    reference = dataset("SC_rgb_rle.dcm").pixel_array.astype(np.int16)
    header, volume = read([(name, raw(name))])
    assert header.channels == 3 and volume.pixels.shape == (1, 100, 100, 3) and volume.pixels.dtype == np.uint8
    difference = np.abs(volume.pixels[0].astype(np.int16) - reference)
    assert difference.mean() < 3.0  # lossy JPEG; a missed YBR conversion would be off by ~100
    assert volume.window is None


def test_multiframe_ybr_ultrasound() -> None:
    header, volume = read([("examples_ybr_color.dcm", raw("examples_ybr_color.dcm"))])
    assert header.shape == (30, 240, 320) and header.channels == 3
    assert [i["frame"] for i in volume.source["instances"]] == list(range(1, 31))
    reference = dataset("examples_ybr_color.dcm").pixel_array[7].astype(np.int16)
    assert np.abs(volume.pixels[7] - reference).mean() < 1.0


def test_palette_colour_becomes_rgb() -> None:
    ds = dataset("examples_palette.dcm")
    _, volume = read([("examples_palette.dcm", raw("examples_palette.dcm"))])
    assert volume.photometric == "PALETTE COLOR" and volume.pixels.shape == (1, 350, 800, 3)
    assert np.array_equal(volume.pixels[0], (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8))


def test_monochrome1_is_inverted_and_its_window_mirrored() -> None:
    name = "dicomdirtests/77654033/CR1/6154"  # CR, MONOCHROME1, 12 bits, slope 0.684, intercept 200
    ds = dataset(name)
    _, volume = read([("cr", sample_path(name).read_bytes())])
    assert volume.modality == "CR" and volume.photometric == "MONOCHROME1"
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    lo, hi = intercept, intercept + 4095 * slope
    assert volume.pixels.dtype == np.float32  # the rescale is not integral
    assert np.allclose(volume.pixels[0], lo + hi - (ds.pixel_array * slope + intercept), atol=1e-3)
    assert volume.window == pytest.approx((lo + hi - float(ds.WindowCenter), float(ds.WindowWidth)))


def test_monochrome1_integer_inversion() -> None:
    ds = dataset("MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    _, volume = read([("m1.dcm", to_bytes(ds))])
    assert volume.pixels.dtype == np.int16
    assert np.array_equal(volume.pixels[0], -1 - ds.pixel_array.astype(np.int32))  # signed 16 bits: lo + hi = -1


# ---------------------------------------------------------------------------------------------- series


def ct_series(count: int = 4, order: tuple[int, ...] = (2, 0, 3, 1)) -> tuple[list[tuple[str, bytes]], list[float]]:
    """CT_small written ``count`` times 2.5 mm apart (each slice offset by its index, so slices are told apart),
    uploaded in a shuffled order."""
    base = dataset("CT_small.dcm")
    files, zs = [], []
    for index in order[:count]:
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        position = [float(v) for v in base.ImagePositionPatient]
        position[2] += 2.5 * index
        ds.ImagePositionPatient = position
        ds.InstanceNumber = 10 - index  # disagrees with the positions on purpose: positions win
        ds.PixelData = (base.pixel_array + index).astype(base.pixel_array.dtype).tobytes()
        files.append((f"IM{index:04d}.dcm", to_bytes(ds)))
        zs.append(position[2])
    return files, zs


def test_series_is_sorted_along_the_slice_normal() -> None:
    files, _ = ct_series()
    base = dataset("CT_small.dcm")
    header, volume = read(files)
    assert header.shape == (4, 128, 128) and header.files == 4
    offsets = [int(volume.pixels[k, 0, 0]) - int(volume.pixels[0, 0, 0]) for k in range(4)]
    assert offsets == [0, 1, 2, 3]  # ascending along the normal, whatever the upload order
    assert volume.spacing[0] == pytest.approx(2.5)
    iop = np.array(base.ImageOrientationPatient, float)
    assert np.cross(iop[:3], iop[3:])[2] > 0  # an axial series: the normal points up
    assert np.allclose(volume.affine[:3, 2], [0, 0, 2.5])
    uids = [pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID for _, data in files]
    order = [uids[files.index(f)] for f in sorted(files, key=lambda f: f[0])]
    assert [i["sop_instance_uid"] for i in volume.source["instances"]] == order


def test_series_without_positions_falls_back_to_instance_numbers() -> None:
    files, _ = ct_series()
    stripped = []
    for name, data in files:
        ds = pydicom.dcmread(io.BytesIO(data))
        del ds.ImagePositionPatient
        stripped.append((name, to_bytes(ds)))
    _, volume = read(stripped)
    offsets = [int(volume.pixels[k, 0, 0]) - int(volume.pixels[-1, 0, 0]) for k in range(4)]
    assert offsets == [3, 2, 1, 0]  # InstanceNumber = 10 - index
    assert volume.affine is None and volume.orientation is None


def test_zip_of_a_series_with_the_usual_clutter() -> None:
    files, _ = ct_series()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("study/", b"")
        archive.writestr("study/DICOMDIR", raw("dicomdirtests/DICOMDIR"))
        archive.writestr("__MACOSX/study/._IM0000.dcm", b"\x00\x05\x16\x07junk")
        archive.writestr("study/README.txt", b"exported by a PACS")
        for name, data in files:
            archive.writestr(f"study/series/{name}", data)
    zipped = [("study.zip", buffer.getvalue())]
    header, volume = read(zipped)
    _, loose = read(files)
    assert header.files == 4 and np.array_equal(volume.pixels, loose.pixels)
    assert refused(zipped, ImageTooLarge, LimitSettings(max_files=3))


def test_zip_bomb_is_refused_from_the_central_directory() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("IM1.dcm", raw("CT_small.dcm"))
        archive.writestr("IM2.dcm", bytes(20 * MIB))
    assert "expansion" in refused([("bomb.zip", buffer.getvalue())], ImageTooLarge)


def test_zip_without_dicom_is_unsupported() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", b"hello")
    refused([("x.zip", buffer.getvalue())], UnsupportedFormat)


def test_enhanced_multiframe_uses_functional_groups() -> None:
    """Three frames whose per-frame positions run backwards, with the rescale in the shared groups."""
    ds = dataset("MR_small.dcm")
    frames = np.stack([ds.pixel_array + k for k in range(3)])
    ds.NumberOfFrames = 3
    ds.PixelData = frames.astype(np.int16).tobytes()
    iop = [float(v) for v in ds.ImageOrientationPatient]
    origin = [float(v) for v in ds.ImagePositionPatient]
    normal = np.cross(iop[:3], iop[3:])
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = iop
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 1
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -100
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in range(3):
        item = Dataset()
        item.PlanePositionSequence = [Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = list(np.array(origin) - 3.0 * k * normal)
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    header, volume = read([("enhanced.dcm", to_bytes(ds))])
    assert header.shape == (3, 64, 64)
    assert [i["frame"] for i in volume.source["instances"]] == [3, 2, 1]
    assert np.array_equal(volume.pixels[0], frames[2] - 100)
    assert volume.spacing[0] == pytest.approx(3.0)
    assert np.allclose(volume.affine[:3, 2], 3.0 * normal)


# ---------------------------------------------------------------------------------------------- refusals

PATIENT_STRINGS = [str(dataset("CT_small.dcm").PatientName), str(dataset("CT_small.dcm").PatientID)]


def no_patient_data(message: str) -> None:
    for value in PATIENT_STRINGS:
        assert value not in message


def test_truncated_file() -> None:
    data = raw("CT_small.dcm")
    message = refused([("IM0003.dcm", data[: len(data) // 2])], InvalidImage)
    assert message.startswith("file 1: ") and "truncated" in message  # by position: names can identify patients
    no_patient_data(message)


def test_truncated_compressed_file_fails_at_decode() -> None:
    data = raw("MR_small_RLE.dcm")
    cut = [("rle.dcm", data[: len(data) - 3000])]
    with pytest.raises(InvalidImage):
        decode(cut, LIMITS)


def test_dataset_without_pixel_data() -> None:
    ds = dataset("CT_small.dcm")
    del ds.PixelData
    message = refused([("a.dcm", to_bytes(ds))], InvalidImage)
    assert "no pixel data" in message
    no_patient_data(message)


def test_segmentation_object_is_not_an_image() -> None:
    assert "segmentation" in refused([("seg.dcm", raw("liver_1frame.dcm"))], InvalidImage)


def test_random_bytes_and_empty_uploads() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert refused([("noise.bin", b"\xaa" + noise)], UnsupportedFormat)
    refused([], InvalidImage)
    assert "empty" in refused([("a.dcm", b"")], InvalidImage)


def test_mixed_series() -> None:
    message = refused([("ct.dcm", raw("CT_small.dcm")), ("mr.dcm", raw("MR_small.dcm"))], InvalidImage)
    assert "mixed series" in message and "file 2" in message and "mr.dcm" not in message
    mr = dataset("MR_small.dcm")
    mr.SeriesInstanceUID = dataset("CT_small.dcm").SeriesInstanceUID
    assert "64 x 64" in refused([("ct.dcm", raw("CT_small.dcm")), ("mr.dcm", to_bytes(mr))], InvalidImage)
    assert "same instance" in refused([("a.dcm", raw("CT_small.dcm")), ("b.dcm", raw("CT_small.dcm"))], InvalidImage)


def test_mixed_formats_and_several_pictures() -> None:
    png = picture_bytes(Image.new("L", (8, 8)), "PNG")
    refused([("ct.dcm", raw("CT_small.dcm")), ("a.png", png)], InvalidImage)
    refused([("a.png", png), ("b.png", png)], InvalidImage)


def test_transfer_syntax_without_decoder() -> None:
    ds = dataset("MR_small_RLE.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG-2: nothing installed decodes video
    message = refused([("video.dcm", to_bytes(ds))], UnsupportedTransferSyntax)
    assert "1.2.840.10008.1.2.4.100" in message


def test_dicom_without_preamble_or_meta() -> None:
    ds = dataset("CT_small.dcm")
    ds.preamble = None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    data = to_bytes(ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    assert data[128:132] != b"DICM"
    _, volume = read([("nometa", data)])
    _, reference = read([("CT_small.dcm", raw("CT_small.dcm"))])
    assert np.array_equal(volume.pixels, reference.pixels)


def test_codestream_declaring_other_dimensions_is_refused_before_decoding() -> None:
    """JPEG decoders allocate what the codestream declares: a 64 x 64 header over a 65535 x 65535 codestream must
    not reach them."""
    ds = dataset("MR_small_jpeg_ls_lossless.dcm")
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sof = frame.index(b"\xff\xf7")  # JPEG-LS frame header: length, precision, rows, columns
    frame[sof + 5 : sof + 9] = b"\xff\xff\xff\xff"
    ds.PixelData = encapsulate([bytes(frame)])
    message = refused_by_decode([("bomb.dcm", to_bytes(ds))], InvalidImage)
    assert "64 x 64" in message


def refused_by_decode(files: list[tuple[str, bytes]], error: type[ServiceError]) -> str:
    probe(files, LIMITS)  # headers are fine: only the pixel data lies
    with pytest.raises(error) as caught:
        decode(files, LIMITS)
    return caught.value.message


FUZZ_SEEDS = ["CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jp2klossless.dcm", "image_dfl.dcm"]


def test_mutated_files_raise_only_service_errors() -> None:
    """Flipped bytes, cuts and odd numbers near the header: every outcome is a volume or a 4xx ServiceError."""
    rng = np.random.default_rng(0)
    seeds = [raw(name) for name in FUZZ_SEEDS] + [nifti(np.ones((4, 5, 6), np.int16))]
    for _ in range(150):
        data = bytearray(seeds[rng.integers(len(seeds))])
        kind = rng.integers(3)
        if kind == 0:
            for _ in range(rng.integers(1, 8)):
                data[rng.integers(len(data))] = rng.integers(256)
        elif kind == 1:
            data = data[: rng.integers(1, len(data))]
        else:
            at = rng.integers(min(len(data) - 4, 1500))
            data[at : at + 4] = int(rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF])).to_bytes(4, "little")
        for entry_point in (probe, decode):
            try:
                entry_point([("fuzz", bytes(data))], LIMITS)
            except ServiceError as exc:
                assert 400 <= exc.http_status < 500


# ------------------------------------------------------------------------------------------------ limits


def test_huge_declared_rows_and_columns_are_refused_by_probe() -> None:
    ds = dataset("CT_small.dcm")
    ds.Rows, ds.Columns = 60000, 60000
    message = refused([("huge.dcm", to_bytes(ds))], ImageTooLarge)
    assert "60000 x 60000" in message


def test_file_slice_voxel_and_byte_limits() -> None:
    files, _ = ct_series()
    assert "limit is 3" in refused(files, ImageTooLarge, LimitSettings(max_files=3))
    refused(files, ImageTooLarge, LimitSettings(max_slices=3))
    refused(files, ImageTooLarge, LimitSettings(max_voxels=128 * 128 * 3))
    refused([("us.dcm", raw("examples_ybr_color.dcm"))], ImageTooLarge, LimitSettings(max_slices=10))
    refused([("ct.dcm", raw("CT_small.dcm"))], PayloadTooLarge, LimitSettings(max_upload_bytes=1000))


# ------------------------------------------------------------------------------------------------- NIfTI


def nifti(data: np.ndarray, affine: np.ndarray | None = None, version: int = 1, **header: float) -> bytes:
    affine = np.diag([0.7, 0.9, 2.5, 1.0]) if affine is None else affine
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    image = klass(data, affine)
    for key, value in header.items():
        image.header[key] = value
    return image.to_bytes()


ANISOTROPIC = np.array([[0.0, 0.0, -2.5, 90.0], [-0.7, 0.0, 0.0, 10.0], [0.0, 0.9, 0.0, -30.0], [0, 0, 0, 1.0]])


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("compressed", [False, True], ids=["nii", "nii.gz"])
def test_nifti_3d_keeps_voxel_order_affine_and_spacing(dtype: type, compressed: bool) -> None:
    data = (np.random.default_rng(1).normal(100, 40, (5, 6, 7))).astype(dtype)
    blob = nifti(data, ANISOTROPIC)
    blob = gzip.compress(blob) if compressed else blob
    header, volume = read([("brain.nii.gz" if compressed else "brain.nii", blob)], hint="mr")
    assert header.format == "nifti" and header.shape == (7, 6, 5) and volume.modality == "MR"
    assert volume.pixels.dtype == dtype
    assert np.array_equal(volume.pixels, data.transpose(2, 1, 0))
    assert volume.pixels[3, 2, 1] == data[1, 2, 3]
    assert np.allclose(volume.affine, ANISOTROPIC) and volume.affine.dtype == np.float64
    assert volume.spacing == pytest.approx((2.5, 0.9, 0.7))
    assert volume.orientation == "".join(nib.aff2axcodes(ANISOTROPIC))
    assert volume.pixels.flags.writeable


def test_nifti_2d_4d_and_nifti2() -> None:
    plane = np.arange(12, dtype=np.uint8).reshape(3, 4)
    _, volume = read([("plane.nii", nifti(plane))])
    assert volume.shape == (1, 4, 3) and np.array_equal(volume.pixels[0], plane.T)
    one_volume = np.arange(24, dtype=np.int16).reshape(2, 3, 4, 1)
    _, volume = read([("t1.nii", nifti(one_volume))])
    assert np.array_equal(volume.pixels, one_volume[..., 0].transpose(2, 1, 0))
    assert "4D" in refused([("t2.nii", nifti(np.zeros((2, 3, 4, 2), np.int16)))], InvalidImage)
    _, volume = read([("v2.nii", nifti(one_volume[..., 0], version=2))])
    assert volume.shape == (4, 3, 2)
    swapped = nib.Nifti1Header(endianness=">")
    swapped.set_data_dtype(np.int16)
    big_endian = nib.Nifti1Image(one_volume[..., 0], np.eye(4), header=swapped).to_bytes()
    assert big_endian[:4] == struct.pack(">i", 348)
    for blob in (big_endian, gzip.compress(big_endian)):
        _, volume = read([("be.nii", blob)])
        assert volume.pixels.dtype == np.int16 and volume.pixels.dtype.isnative
        assert np.array_equal(volume.pixels, one_volume[..., 0].transpose(2, 1, 0))


def test_nifti_scaling_and_non_finite_voxels() -> None:
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    _, volume = read([("int.nii", nifti(data, scl_slope=2, scl_inter=-1024))])
    assert volume.pixels.dtype == np.int16 and np.array_equal(volume.pixels, (data * 2 - 1024).transpose(2, 1, 0))
    _, volume = read([("frac.nii", nifti(data, scl_slope=0.5, scl_inter=1))])
    assert volume.pixels.dtype == np.float32 and np.allclose(volume.pixels, (data * 0.5 + 1).transpose(2, 1, 0))
    holes = data.astype(np.float32)
    holes[0, 0, 0], holes[1, 1, 1] = np.nan, np.inf
    _, volume = read([("nan.nii", nifti(holes))])
    assert volume.pixels[0, 0, 0] == np.nanmin(holes[np.isfinite(holes)])
    with pytest.raises(InvalidImage, match="no finite voxel"):  # a property of the voxels: probe cannot see it
        decode([("allnan.nii", nifti(np.full((2, 2, 2), np.nan, np.float32)))], LIMITS)
    refused([("complex.nii", nifti(np.zeros((2, 2, 2), np.complex64)))], InvalidImage)


def test_nifti_rgb24() -> None:
    rgb = np.zeros((4, 3, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"] = 10, 200
    header, volume = read([("rgb.nii", nifti(rgb))])
    assert header.channels == 3 and volume.pixels.shape == (2, 3, 4, 3)
    assert (volume.pixels[..., 0] == 10).all() and (volume.pixels[..., 1] == 200).all()


def test_nifti_declaring_too_many_voxels_is_refused_from_the_header() -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 200))
    header.set_data_dtype(np.int16)
    header.set_data_offset(352)
    blob = header.binaryblock + b"\x00" * 4
    assert "voxels" in refused([("big.nii", blob)], ImageTooLarge)
    assert "voxels" in refused([("big.nii.gz", gzip.compress(blob))], ImageTooLarge)


def zeros_gz(head: bytes, zeros: int) -> bytes:
    """gzip of ``head`` followed by ``zeros`` zero bytes, compressed in a stream (never held inflated)."""
    engine = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [engine.compress(head)]
    chunk = bytes(MIB)
    for _ in range(zeros // MIB):
        parts.append(engine.compress(chunk))
    parts.append(engine.flush())
    return b"".join(parts)


def test_gzip_bomb_is_refused_without_inflating_it() -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 256))  # 128 MiB of int16, within the voxel limit
    header.set_data_dtype(np.int16)
    header.set_data_offset(352)
    bomb = zeros_gz(header.binaryblock + b"\x00" * 4, 128 * MIB)
    tracemalloc.start()
    try:
        message = refused([("bomb.nii.gz", bomb)], ImageTooLarge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "expansion" in message and peak < 8 * MIB


def test_gzip_trailing_garbage_is_never_inflated() -> None:
    small = nifti(np.ones((4, 4, 4), np.int16))
    stream = zeros_gz(small, 64 * MIB)
    tracemalloc.start()
    try:
        _, volume = read([("padded.nii.gz", stream)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert volume.shape == (4, 4, 4) and (volume.pixels == 1).all() and peak < 8 * MIB


def test_truncated_and_header_only_nifti() -> None:
    blob = nifti(np.ones((8, 8, 8), np.int16))
    assert "truncated" in refused([("cut.nii", blob[:-100])], InvalidImage)
    with pytest.raises(InvalidImage):
        decode([("cut.nii.gz", gzip.compress(blob)[:-200])], LIMITS)
    pair = bytearray(blob[:352])
    pair[344:348] = b"ni1\x00"
    refused([("pair.hdr", bytes(pair))], UnsupportedFormat)


def test_mni152_template() -> None:
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=2)
    blob = template.to_bytes()
    reference = nib.Nifti1Image.from_bytes(blob)
    header, volume = read([("mni152.nii.gz", gzip.compress(blob, 1))], hint="MR")
    assert header.shape == tuple(reversed(reference.shape))
    assert np.allclose(volume.pixels, np.asanyarray(reference.dataobj).transpose(2, 1, 0), atol=1e-6)
    assert np.allclose(volume.affine, reference.affine) and volume.orientation == "RAS"
    assert volume.spacing == (2.0, 2.0, 2.0)


# ---------------------------------------------------------------------------------------------- pictures


def picture_bytes(picture: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_grey_and_colour_pictures() -> None:
    from skimage import data as samples

    camera, astronaut = samples.camera(), samples.astronaut()
    header, volume = read([("camera.png", picture_bytes(Image.fromarray(camera), "PNG"))], hint="xr")
    assert header.format == "png" and header.channels == 1 and volume.modality == "XR"
    assert volume.pixels.dtype == np.uint8 and np.array_equal(volume.pixels[0], camera)
    header, volume = read([("astronaut.jpg", picture_bytes(Image.fromarray(astronaut), "JPEG", quality=95))])
    assert header.format == "jpeg" and volume.pixels.shape == (1, 512, 512, 3)
    assert np.abs(volume.pixels[0].astype(int) - astronaut).mean() < 4
    _, volume = read([("camera.jpg", picture_bytes(Image.fromarray(camera), "JPEG"))])
    assert volume.pixels.shape == (1, 512, 512) and volume.modality is None


def test_picture_modes() -> None:
    deep = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16)
    _, volume = read([("deep.png", picture_bytes(Image.fromarray(deep), "PNG"))])
    assert volume.pixels.dtype == np.uint16 and np.array_equal(volume.pixels[0], deep)
    rgba = Image.new("RGBA", (10, 6), (10, 20, 30, 40))
    _, volume = read([("rgba.png", picture_bytes(rgba, "PNG"))])
    assert volume.pixels.shape == (1, 6, 10, 3) and (volume.pixels[0] == (10, 20, 30)).all()
    palette = Image.new("P", (5, 5))
    palette.putpalette([0, 0, 0, 250, 100, 50] * 128)
    palette.putpixel((2, 3), 1)
    _, volume = read([("p.png", picture_bytes(palette, "PNG"))])
    assert tuple(volume.pixels[0, 3, 2]) == (250, 100, 50)
    _, volume = read([("bw.png", picture_bytes(Image.new("1", (9, 7), 1), "PNG"))])
    assert volume.pixels.dtype == np.uint8 and (volume.pixels == 255).all()
    _, volume = read([("cmyk.jpg", picture_bytes(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"))])
    assert volume.pixels.shape == (1, 8, 8, 3)


def test_broken_and_oversized_pictures() -> None:
    png = picture_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)), "PNG")
    with pytest.raises(InvalidImage):
        decode([("cut.png", png[: len(png) // 2])], LIMITS)
    refused([("a.png", png)], ImageTooLarge, LimitSettings(max_pixels_per_slice=1000))
    # Headers that declare huge pictures over a few bytes of data: refused before a pixel is decoded, by the
    # service's limit, or by Pillow's own bomb check where that strikes first (it runs inside Image.open).
    assert "12000 x 12000" in refused([("big.png", declared_png(12000, 12000))], ImageTooLarge)
    refused([("huge.png", declared_png(100000, 100000))], ImageTooLarge)


def declared_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def test_a_blank_image_that_compresses_500_to_1_is_an_input_by_default() -> None:
    blob = gzip.compress(nib.Nifti1Image(np.zeros((197, 233, 1), np.float32), np.eye(4)).to_bytes())
    assert len(blob) * 200 < 197 * 233 * 4  # over the ratio, below the floor
    volume = decode([("zeros.nii.gz", blob)], LimitSettings())
    assert volume.pixels.shape == (1, 233, 197) and not volume.pixels.any()
    with pytest.raises(ImageTooLarge):
        decode([("zeros.nii.gz", blob)], LimitSettings(expansion_floor_bytes=0))
