"""NumPy tensors as uploads (service.inputs.tensor): every layout, both datatypes, and the bytes that must be refused
before a pixel is read. Everything is made in memory with ``np.save``."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from service.config import LimitSettings
from service.errors import ImageTooLarge, InvalidImage, InvalidTensor, ServiceError
from service.inputs import decode, probe
from service.inputs.sniff import classify
from service.inputs.tensor import check_shape, default_layout, encode, layout_from_name
from tests.service.harness import disc_image, png_bytes

LIMITS = LimitSettings()


def npy(array: np.ndarray, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)  # type: ignore[arg-type]
    return buffer.getvalue()


def rgb_image(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def read(files: list[tuple[str, bytes]], limits: LimitSettings = LIMITS, **kwargs: object):
    """probe then decode, as gateway and worker do; the header must announce what decode delivers."""
    header = probe(files, limits, **kwargs)  # type: ignore[arg-type]
    volume = decode(files, limits, **kwargs)  # type: ignore[arg-type]
    assert header.format == volume.format == "tensor"
    assert header.shape == volume.shape and header.channels == volume.channels
    assert header.modality == volume.modality and header.files == 1
    assert volume.pixels.flags.writeable and volume.pixels.flags.c_contiguous and volume.pixels.flags.owndata
    return header, volume


# [Z, Y, X, C] canonical arrays, and how each layout lays them out.
def laid_out(canonical: np.ndarray, layout: str) -> np.ndarray:
    array = canonical
    if "N" not in layout:
        array = array[0]
    if "C" not in layout:
        array = array[..., 0]
    source = [axis for axis in "NHWC" if axis in layout]
    return np.ascontiguousarray(array.transpose([source.index(axis) for axis in layout]))


@pytest.mark.parametrize("layout", ["HW", "HWC", "CHW", "NHW", "NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_every_layout_becomes_slices_rows_columns(layout: str, dtype: type) -> None:
    slices = 3 if "N" in layout else 1
    channels = 3 if "C" in layout else 1
    rng = np.random.default_rng(1)
    canonical = rng.integers(0, 256, (slices, 5, 7, channels)).astype(np.uint8)
    values = canonical if dtype == np.uint8 else canonical.astype(np.float32) / 255
    if dtype == np.float32 and channels == 1:
        values = canonical.astype(np.float32) * 10 - 1000  # grey floats are intensities: any range
    array = laid_out(values.astype(dtype), layout)
    name, data = encode(array, layout)
    assert name == f"tensor.{layout}.npy"
    header, volume = read([(name, data)], modality_hint="mr")
    assert header.shape == (slices, 5, 7) and header.channels == channels and header.modality == "MR"
    if channels == 3:
        # RGB is 8-bit whatever came in; FP32 in [0, 1] comes back exactly as the uint8 it was made from.
        assert volume.pixels.dtype == np.uint8
        assert np.array_equal(volume.pixels, canonical)
    else:
        assert volume.pixels.dtype == dtype
        assert np.array_equal(volume.pixels, values[..., 0].astype(dtype))


def test_rgb_tensor_decodes_like_the_same_png() -> None:
    image = rgb_image()
    as_png = decode([("x.png", png_bytes(image))], LIMITS)
    _, as_tensor = read([encode(image, "HWC")])
    assert np.array_equal(as_tensor.pixels, as_png.pixels)


def test_layout_comes_from_the_keyword_else_the_name_else_the_shape() -> None:
    stack = np.zeros((3, 8, 9), np.uint8)  # three grey slices, or one CHW RGB picture
    data = npy(stack)
    assert read([("x.npy", data)])[0].shape == (1, 8, 9)  # shape rule: [3, H, W] is CHW
    assert read([("tensor.NHW.npy", data)])[0].shape == (3, 8, 9)
    assert read([("tensor.NHW.npy", data)], layout="CHW")[0].shape == (1, 8, 9)
    assert layout_from_name("tensor.NHWC.npy") == "NHWC" and layout_from_name("dir/NCHW.npy") == "NCHW"
    assert layout_from_name("x.npy") is None and layout_from_name("tensor.nhwc.npy") is None


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((64, 48), "HW"),
        ((64, 48, 3), "HWC"),
        ((64, 48, 1), "HWC"),
        ((3, 64, 3), "HWC"),
        ((3, 64, 48), "CHW"),
        ((1, 64, 48), "CHW"),
        ((10, 64, 48), "NHW"),
        ((2, 64, 48, 3), "NHWC"),
        ((2, 3, 64, 48), "NCHW"),
    ],
)
def test_default_layout(shape: tuple[int, ...], layout: str) -> None:
    assert default_layout(shape) == layout


@pytest.mark.parametrize(
    ("shape", "layout", "words"),
    [
        ((5,), None, "rank 1"),
        ((1, 2, 3, 4, 5), None, "rank 5"),
        ((2, 8, 8, 8), None, "name the layout"),
        ((8, 8, 2), "HWC", "2 channels"),
        ((8, 8), "HWC", "layout HWC needs 3"),
        ((8, 0), None, "shorter than 1"),
        ((8, 8), "WH", "unknown layout"),
    ],
)
def test_bad_shapes_are_invalid_tensors(shape: tuple[int, ...], layout: str | None, words: str) -> None:
    with pytest.raises(InvalidTensor, match=words):
        check_shape(shape, layout, LIMITS)


def test_fp32_values_are_checked() -> None:
    grey = np.zeros((8, 8), np.float32)
    grey[2, 3] = np.nan
    with pytest.raises(InvalidTensor, match="not finite"):
        decode([encode(grey, "HW")], LIMITS)
    rgb = np.full((8, 8, 3), 0.5, np.float32)
    rgb[0, 0, 0] = 1.5
    with pytest.raises(InvalidTensor, match=r"\[0, 1\].*1\.5"):
        decode([encode(rgb, "HWC")], LIMITS)
    # intensities have no range: Hounsfield units go through as they are
    ct = np.full((8, 8), -1000.0, np.float32)
    assert decode([encode(ct, "HW")], LIMITS, "CT").pixels.min() == -1000.0


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((4, 4), np.int16), "dtype <i2"),
        (np.zeros((4, 4), np.float64), "dtype <f8"),
        (np.zeros((4, 4), ">f4"), "dtype >f4"),
        (np.zeros((4, 4), bool), "dtype |b1"),
    ],
)
def test_only_uint8_and_float32_are_read(array: np.ndarray, words: str) -> None:
    for read_ in (probe, decode):
        with pytest.raises(InvalidTensor, match=words):
            read_([("t.npy", npy(array))], LIMITS)


SPRUNG: list[int] = []


class _Trap:
    """Unpickling this would call ``_sprung``: the reader must never get that far."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return _sprung, ()


def _sprung() -> None:
    SPRUNG.append(1)


def test_object_arrays_are_refused_without_unpickling() -> None:
    data = npy(np.array([_Trap(), 1], dtype=object), allow_pickle=True)
    for read_ in (probe, decode):
        with pytest.raises(InvalidTensor, match="dtype"):
            read_([("t.npy", data)], LIMITS)
    assert SPRUNG == []


def test_fortran_order_is_refused() -> None:
    with pytest.raises(InvalidTensor, match="Fortran"):
        probe([("t.npy", npy(np.asfortranarray(np.zeros((4, 5), np.uint8))))], LIMITS)


def test_broken_files_are_invalid_images() -> None:
    good = npy(np.zeros((6, 6), np.uint8))
    for data, words in [
        (good[:-1], "35 bytes of pixel data"),
        (good + b"\x00", "37 bytes of pixel data"),
        (good[:20], "not a readable .npy header"),
        (b"\x93NUMPY\x03\x00" + good[8:], "version 3.0"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': os}   \n", "not a readable .npy header"),
    ]:
        for read_ in (probe, decode):
            with pytest.raises(InvalidImage, match=words):
                read_([("t.npy", data)], LIMITS)


def test_limits_are_checked_from_the_header_before_the_byte_count() -> None:
    # A header declaring 100k x 100k pixels over no data at all: too large, not truncated, and nothing allocated.
    with pytest.raises(ImageTooLarge, match="pixels per slice"):
        probe([("t.npy", header_only("(100000, 100000)"))], LIMITS)
    small = LimitSettings(max_slices=2, max_voxels=1000)
    with pytest.raises(ImageTooLarge, match="3 slices"):
        probe([encode(np.zeros((3, 4, 4), np.uint8), "NHW")], small)
    with pytest.raises(ImageTooLarge, match="1600 voxels"):
        probe([encode(np.zeros((40, 40), np.uint8), "HW")], small)


def header_only(shape: str) -> bytes:
    """A version 1.0 npy header for uint8 ``shape`` with no data after it."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (-(10 + len(text) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def test_npy_is_sniffed_by_content_and_one_per_upload() -> None:
    data = npy(np.zeros((4, 4), np.uint8))
    fmt, members = classify([("no-extension", data)], LIMITS)
    assert fmt == "tensor" and len(members) == 1
    with pytest.raises(InvalidImage, match="only a DICOM series"):
        classify([("a.npy", data), ("b.npy", data)], LIMITS)
    with pytest.raises(ServiceError):
        classify([("a.npy", data), ("b.png", png_bytes(disc_image()))], LIMITS)
