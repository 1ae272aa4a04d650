"""Hostile headers, generated: every DICOM or NIfTI an attacker can write gets a volume or a 4xx, never anything else.

Byte flips (tests/service/test_inputs.py) rarely hit the fields that size allocations. These tests let hypothesis
choose those fields' values directly: rows, columns, frames, bits, samples, pixel representation and the pixel data's
length for DICOM; dims, datatype, bitpix, scaling and the data offset for NIfTI; and the limits the gateway and the
worker check them against are small, so "checked before allocation" is what is exercised. hypothesis shrinks any
failure to the smallest header that causes it.
"""

from __future__ import annotations

import copy
import io
import struct
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from service.config import LimitSettings
from service.errors import ServiceError
from service.inputs import decode, probe
from service.outputs.dicom_headers import encode_headers

# Small limits: a header that declares more than these must be refused before any buffer of that size exists.
LIMITS = LimitSettings(
    max_upload_bytes=8 << 20,
    max_pixels_per_slice=512 * 512,
    max_slices=64,
    max_voxels=4 << 20,
    max_expansion_ratio=50,
    expansion_floor_bytes=0,
)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _ct() -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]


CT = _ct()
SIZES = st.one_of(st.integers(0, 4), st.integers(0, 2**16 - 1), st.sampled_from([1, 127, 128, 129, 512, 65535]))


def outcome(files: list[tuple[str, bytes]]) -> str:
    """'volume', or the 4xx code; anything else (another exception, a 5xx) fails the test."""
    for entry_point in (probe, decode):
        try:
            entry_point(files, LIMITS)
        except ServiceError as err:
            assert 400 <= err.http_status < 500, (err.code, err.message)
            return err.code
    return "volume"


@FUZZ
@given(
    rows=SIZES,
    columns=SIZES,
    frames=st.one_of(st.none(), st.integers(-2, 2**31 - 1)),
    bits_allocated=st.sampled_from([0, 1, 7, 8, 12, 16, 24, 32, 64, 65535]),
    bits_stored=st.integers(0, 64),
    samples=st.sampled_from([0, 1, 2, 3, 4, 65535]),
    signed=st.sampled_from([0, 1, 2]),
    pixel_bytes=st.one_of(st.just(None), st.integers(0, 70_000)),
    photometric=st.sampled_from(["MONOCHROME2", "MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL", "BOGUS", ""]),
)
def test_dicom_headers_that_lie_get_a_4xx(
    rows: int,
    columns: int,
    frames: int | None,
    bits_allocated: int,
    bits_stored: int,
    samples: int,
    signed: int,
    pixel_bytes: int | None,
    photometric: str,
) -> None:
    ds = copy.deepcopy(CT)  # Dataset.copy() is shallow: it would share (and change) CT's elements
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, max(bits_stored - 1, 0)
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = samples, signed, photometric
    if frames is not None:
        ds.NumberOfFrames = frames
    if pixel_bytes is not None:
        ds.PixelData = bytes(pixel_bytes + pixel_bytes % 2)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    result = outcome([("fuzz.dcm", buffer.getvalue())])
    if result == "volume":  # accepted: then it really was within the limits
        assert rows * columns <= LIMITS.max_pixels_per_slice and (frames or 1) <= LIMITS.max_slices


def _nifti_header(dims: list[int], datatype: int, bitpix: int, vox_offset: float, slope: float) -> bytes:
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    header = bytearray(image.header.binaryblock)
    struct.pack_into("<8h", header, 40, *dims)
    struct.pack_into("<h", header, 70, datatype)
    struct.pack_into("<h", header, 72, bitpix)
    struct.pack_into("<f", header, 108, vox_offset)
    struct.pack_into("<f", header, 112, slope)
    return bytes(header) + b"\0" * 4


@FUZZ
@given(
    ndim=st.integers(-1, 9),
    sizes=st.lists(st.one_of(st.integers(-3, 3), st.integers(0, 32767)), min_size=7, max_size=7),
    datatype=st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 9999]),
    bitpix=st.sampled_from([0, 1, 8, 16, 32, 64, 128, 255]),
    vox_offset=st.sampled_from([0.0, 348.0, 352.0, 353.5, -1.0, 1e12, float("nan"), float("inf")]),
    slope=st.sampled_from([0.0, 1.0, -1.0, 1e38, float("nan"), float("inf")]),
    body=st.binary(max_size=4096),
)
def test_nifti_headers_that_lie_get_a_4xx(
    ndim: int, sizes: list[int], datatype: int, bitpix: int, vox_offset: float, slope: float, body: bytes
) -> None:
    data = _nifti_header([ndim, *sizes], datatype, bitpix, vox_offset, slope) + body
    outcome([("fuzz.nii", data)])


@pytest.mark.parametrize(
    "preamble",
    [b"\x89PNG\r\n\x1a\n", b"PK\x03\x04", b"\xff\xd8\xff\xe0", b"\x5c\x01\x00\x00n+1\x00", b"\x7fELF", b"#!/bin/sh\n"],
    ids=["png", "zip", "jpeg", "nifti", "elf", "script"],
)
def test_the_dicom_preamble_is_never_trusted(preamble: bytes) -> None:
    """The 128 bytes before "DICM" are free for any use, so a file can be a valid DICOM and look like a PNG, a zip or
    a program to a tool that reads from byte 0 (a polyglot). The service reads them as DICOM and ignores the
    preamble, and the headers it keeps for a DICOM SEG are written with an empty one."""
    ds = copy.deepcopy(CT)  # Dataset.copy() is shallow: it would share (and change) CT's elements
    ds.preamble = (preamble + bytes(128))[:128]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    files = [("polyglot", buffer.getvalue())]
    header = probe(files, LIMITS)
    volume = decode(files, LIMITS)
    assert header.format == volume.format == "dicom"
    plain = copy.deepcopy(CT)
    plain.preamble = bytes(128)
    clean = io.BytesIO()
    plain.save_as(clean, enforce_file_format=True)
    assert np.array_equal(volume.pixels, decode([("plain", clean.getvalue())], LIMITS).pixels)
    (kept,) = encode_headers(volume.source["headers"])
    assert kept[:128] == bytes(128) and kept[128:132] == b"DICM"
