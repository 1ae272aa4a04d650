"""Raw tensors as uploads: a NumPy ``.npy`` file (``np.save(..., allow_pickle=False)``) with a named axis layout.

The Open Inference Protocol sends pixels as a bare tensor. The KServe handler wraps it in an ``.npy`` file so a tensor
travels through the same probe, queue, payload and worker as every DICOM or PNG upload, and the axis layout rides in
the file name (``tensor.NHWC.npy``): the worker needs no field that other uploads lack.

An ``.npy`` header is a Python literal, and ``np.load`` would unpickle object arrays; neither is acceptable for
untrusted bytes. The header is read with ``numpy.lib.format``'s own parser (a bounded ``ast.literal_eval``) and the
shape, dtype and limits are checked before a single pixel is touched; ``np.load`` is never called.

What the values mean (the same rule for every protocol, since they all arrive here):

- ``uint8``, 1 channel: grey values, preprocessed like any grey volume (the 0.5 / 99.5 percentiles; the CT window
  with ``modality=CT``). ``uint8``, 3 channels: RGB, exactly as a decoded PNG.
- ``float32``, 1 channel: intensities in the caller's units (Hounsfield units with ``modality=CT``, anything
  otherwise), preprocessed like any grey volume.
- ``float32``, 3 channels: RGB in [0, 1], as ``torchvision``'s ``ToTensor`` and most loaders produce it; stored as
  ``uint8`` (``round(x * 255)``) because the service's RGB path is 8-bit. Values outside [0, 1] are refused rather
  than guessed at (a 0..255 float image scaled again would saturate without a word).
- Non-finite values are refused: a NaN in a request is a caller's bug, not a masked map to repair.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from service.config import LimitSettings
from service.errors import ImageTooLarge, InvalidImage, InvalidTensor
from service.inputs.spool import Data, opener
from service.inputs.volume import InputHeader, Upload, Volume

LAYOUTS = ("HW", "HWC", "CHW", "NHW", "NHWC", "NCHW")
DTYPES = {np.dtype("<u1"): "UINT8", np.dtype("<f4"): "FP32"}
CHANNELS = (1, 3)
# numpy's own default; a header longer than this is not something np.save writes for a plain array.
_MAX_HEADER = 10_000
_NAME = re.compile(r"(?:^|[./])(" + "|".join(LAYOUTS) + r")\.npy$")


def layout_from_name(name: str) -> str | None:
    """The layout a file name carries (``tensor.NHWC.npy`` -> ``NHWC``); None when it names none."""
    found = _NAME.search(name)
    return found.group(1) if found else None


def file_name(layout: str) -> str:
    return f"tensor.{layout}.npy"


def default_layout(shape: Sequence[int]) -> str:
    """The layout a tensor most plausibly has when the caller names none.

    Channels last wins over channels first ([3, 64, 3] is a 3-row RGB image); a rank-3 tensor with neither end in
    {1, 3} is a stack of grey slices. [3, H, W] is read as CHW RGB, never as three grey slices: a caller who means
    the latter says ``NHW``.
    """
    rank = len(shape)
    if rank == 2:
        return "HW"
    if rank == 3:
        if shape[2] in CHANNELS:
            return "HWC"
        if shape[0] in CHANNELS:
            return "CHW"
        return "NHW"
    if rank == 4:
        if shape[3] in CHANNELS:
            return "NHWC"
        if shape[1] in CHANNELS:
            return "NCHW"
        raise InvalidTensor(
            f"shape {list(shape)}: neither axis 1 nor axis 3 holds 1 or 3 channels; name the layout (NHWC or NCHW)"
        )
    raise InvalidTensor(f"shape {list(shape)}: rank {rank}; send 2 to 4 axes ({', '.join(LAYOUTS)})")


def check_shape(
    shape: Sequence[int], layout: str | None, limits: LimitSettings, what: str = "the tensor"
) -> tuple[str, tuple[int, int, int], int]:
    """The layout (given or inferred), the (z, y, x) shape and the channel count, after the limits.

    Shared by the reader and the protocol handlers, so a request is refused with the same words wherever it enters.
    """
    dims = [int(d) for d in shape]
    if any(d < 1 for d in dims):
        raise InvalidTensor(f"{what}: shape {dims} has an axis shorter than 1")
    if layout is None:
        layout = default_layout(dims)
    if layout not in LAYOUTS:
        raise InvalidTensor(f"{what}: unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if len(dims) != len(layout):
        raise InvalidTensor(f"{what}: shape {dims} has {len(dims)} axes, layout {layout} needs {len(layout)}")
    axes = dict(zip(layout, dims, strict=True))
    channels = axes.get("C", 1)
    if channels not in CHANNELS:
        raise InvalidTensor(f"{what}: {channels} channels (layout {layout}); send 1 (grey) or 3 (RGB)")
    z, y, x = axes.get("N", 1), axes["H"], axes["W"]
    if y * x > limits.max_pixels_per_slice:
        raise ImageTooLarge(f"{what}: {y} x {x} pixels per slice, the limit is {limits.max_pixels_per_slice}")
    if z > limits.max_slices:
        raise ImageTooLarge(f"{what}: {z} slices, the limit is {limits.max_slices}")
    if z * y * x > limits.max_voxels:
        raise ImageTooLarge(f"{what}: {z * y * x} voxels, the limit is {limits.max_voxels}")
    return layout, (z, y, x), channels


def encode(array: np.ndarray, layout: str) -> Upload:
    """A validated tensor as the upload the worker reads: (``tensor.LAYOUT.npy``, npy bytes)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return file_name(layout), buffer.getvalue()


def _header(stream: BinaryIO, what: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset from the npy header alone (``stream`` at the file's start)."""
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(stream, max_header_size=_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(stream, max_header_size=_MAX_HEADER)
        else:
            raise InvalidImage(f"{what}: .npy format version {version[0]}.{version[1]} is not supported; use 1.0/2.0")
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise InvalidImage(f"{what}: not a readable .npy header ({type(exc).__name__})") from exc
    if dtype not in DTYPES:
        raise InvalidTensor(f"{what}: dtype {dtype.str}; send uint8 or little-endian float32")
    if fortran:
        raise InvalidTensor(f"{what}: Fortran-ordered array; send it C-ordered (np.ascontiguousarray)")
    return tuple(shape), dtype, stream.tell()


def _read_header(
    data: Data, limits: LimitSettings, layout: str | None, what: str
) -> tuple[tuple[int, ...], np.dtype, int, str, tuple[int, int, int], int]:
    """The header, checked in the order that costs nothing: format, dtype, shape against the limits, and only then
    the byte count (a huge declared shape is refused as too large, not as truncated)."""
    with opener(data) as stream:
        shape, dtype, offset = _header(stream, what)
    layout, zyx, channels = check_shape(shape, layout, limits, what)
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - offset != expected:
        raise InvalidImage(f"{what}: {len(data) - offset} bytes of pixel data, shape {list(shape)} needs {expected}")
    return shape, dtype, offset, layout, zyx, channels


def probe_tensor(
    data: Data, limits: LimitSettings, layout: str | None, modality_hint: str | None, what: str = "the tensor"
) -> InputHeader:
    """From the header alone: ``data`` may be a spooled upload the gateway never reads whole."""
    _, _, _, _, zyx, channels = _read_header(data, limits, layout, what)
    return InputHeader("tensor", modality_hint, zyx, channels, 1, None)


def decode_tensor(
    data: bytes, limits: LimitSettings, layout: str | None, modality_hint: str | None, what: str = "the tensor"
) -> Volume:
    shape, dtype, offset, layout, (z, y, x), channels = _read_header(data, limits, layout, what)
    raw = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
    # Every layout to [N, H, W, C]; missing axes become length 1.
    full = "NHWC"
    for axis in full:
        if axis not in layout:
            raw = raw[..., None]
            layout += axis
    canonical = raw.transpose([layout.index(axis) for axis in full])
    if channels == 1:
        out = np.empty((z, y, x), dtype=dtype)
        for k in range(z):
            out[k] = canonical[k, :, :, 0]
            check_values(out[k], channels, what)
    elif dtype == np.uint8:
        out = np.array(canonical, order="C")  # a copy: the volume owns writable pixels
    else:
        out = np.empty((z, y, x, 3), dtype=np.uint8)
        for k in range(z):
            plane = canonical[k]
            check_values(plane, channels, f"{what} slice {k}")
            out[k] = np.rint(plane * np.float32(255))
    return Volume(pixels=out, format="tensor", modality=modality_hint)


def check_values(values: np.ndarray, channels: int, what: str = "the tensor") -> None:
    """The value rules above, for any part of a tensor (the gateway checks the whole, the reader slice by slice)."""
    if values.dtype.kind != "f" or values.size == 0:
        return
    if not np.isfinite(values).all():
        raise InvalidTensor(f"{what}: values that are not finite (NaN or infinity)")
    if channels == 3:
        low, high = float(values.min()), float(values.max())
        if low < 0.0 or high > 1.0:
            raise InvalidTensor(
                f"{what}: FP32 RGB values must lie in [0, 1], these span {low:g} .. {high:g}; send UINT8 for 0..255"
            )
