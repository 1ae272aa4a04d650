"""The shapes the input readers hand over: a header summary for the gateway, a decoded volume for the worker.

The gateway only ever sees an ``InputHeader`` (cheap, no pixels); the worker gets a ``Volume`` it segments slice by
slice. ``Member`` is the reader-side view of one file once zips are opened, so DICOM series code never cares whether
its files came as multipart parts or as zip members.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import numpy as np

from service.errors import InvalidImage
from service.inputs.spool import Data

# (file name as the client gave it, possibly ""; its bytes, or on the gateway a large file spooled to disk)
Upload = tuple[str, Data]
Format = Literal["dicom", "nifti", "png", "jpeg", "tensor"]
# A member's format as sniffed: "nifti-gz" is NIfTI behind gzip, told apart because its header needs inflating.
Kind = Literal["dicom", "nifti", "nifti-gz", "png", "jpeg", "tensor"]


@dataclass(frozen=True)
class InputHeader:
    """What headers alone say about an upload: enough to refuse it early and to describe it in the result."""

    format: Format
    modality: str | None  # DICOM Modality, else the caller's hint
    shape: tuple[int, int, int]  # (z, y, x) = (slices, rows, columns) as declared
    channels: int  # 1 or 3
    files: int  # zip members count individually
    transfer_syntax: str | None  # DICOM TransferSyntaxUID of the first file
    series_uid: str | None = None  # DICOM SeriesInstanceUID: what a caller looks the job up by, never logged


@dataclass
class Volume:
    """Decoded pixels with the geometry needed to put a mask back where it belongs.

    ``pixels`` is [Z, Y, X] grey (uint8, int16, uint16 or float32: values after rescale slope/intercept; integer
    types are kept whenever the rescale is integral so a large CT is never widened) or [Z, Y, X, 3] uint8 RGB.
    ``affine`` maps voxel indices in (x, y, z) order - the reverse of the array's axes, as NIfTI does - to world mm:
    RAS for NIfTI (the file's own affine), LPS for DICOM. ``source`` carries DICOM identifiers for writing a DICOM
    SEG later; it is left out of ``repr`` so it cannot reach a log by accident.
    """

    pixels: np.ndarray = field(repr=False)
    format: Format
    modality: str | None = None
    spacing: tuple[float, float, float] | None = None  # (z, y, x) mm
    orientation: str | None = None
    affine: np.ndarray | None = field(default=None, repr=False)
    window: tuple[float, float] | None = None  # (center, width) in rescaled units
    photometric: str | None = None
    source: dict[str, Any] = field(default_factory=dict, repr=False)
    # The file's own axis codes when the voxels were reoriented for slicing (service/inputs/orientation.py).
    stored_orientation: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.pixels.shape[:3]
        return int(z), int(y), int(x)

    @property
    def channels(self) -> int:
        return 3 if self.pixels.ndim == 4 else 1


@dataclass(frozen=True)
class Member:
    """One file of an upload after zips are opened. ``read`` gives all bytes, ``open`` a stream for header-only
    reads (a zip member is then inflated only as far as its header), ``upload`` the file as it is to be queued (a
    spooled upload stays on disk; a zip member's bytes)."""

    label: str  # how messages name it, by position only: "file 2" or "file 1 member 7" (names can identify patients)
    kind: Kind
    size: int  # bytes, uncompressed for zip members
    read: Callable[[], bytes] = field(repr=False)
    open: Callable[[], BinaryIO] = field(repr=False)
    upload: Callable[[], Data] = field(repr=False)


_INTEGER_STORAGE = (np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.uint16))


def storage_dtype(lo: float, hi: float) -> np.dtype:
    """The narrowest of the contract's grey dtypes that holds [lo, hi] exactly; float32 past 16 bits (exact up to
    2**24, far beyond any scanner's range)."""
    for dtype in _INTEGER_STORAGE:
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return np.dtype(np.float32)


def repair_non_finite(out: np.ndarray, what: str) -> None:
    """NaN and inf (masked maps write them outside the brain) become the finite extremes, slice by slice, in place:
    everything downstream (percentiles, the network) assumes finite pixels."""
    lo, hi, bad = math.inf, -math.inf, []
    for k, plane in enumerate(out):
        finite = np.isfinite(plane)
        if finite.all():
            lo, hi = min(lo, float(plane.min())), max(hi, float(plane.max()))
        else:
            bad.append(k)
            if finite.any():
                lo, hi = min(lo, float(plane[finite].min())), max(hi, float(plane[finite].max()))
    if lo > hi:
        raise InvalidImage(f"{what}: no finite voxel")
    for k in bad:
        np.nan_to_num(out[k], copy=False, nan=lo, posinf=hi, neginf=lo)
