"""NIfTI-1 and NIfTI-2 single files, plain or gzip-compressed, read from memory.

nibabel parses the header alone, which is checked against the limits before anything is inflated; then exactly the
bytes the header declares are inflated (a gzip bomb stops there) and viewed in place as the voxel array, so the only
full-size allocation is the volume itself. Voxels keep the file's order - pixels[z, y, x] == data[x, y, z] - and the
file's affine is returned unchanged: nothing is reoriented, so a mask written back lines up with the input.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from nibabel.nifti1 import Nifti1Header
from nibabel.nifti2 import Nifti2Header
from nibabel.orientations import aff2axcodes

from service.config import LimitSettings
from service.errors import ImageTooLarge, InvalidImage, ServiceError
from service.inputs.sniff import GZIP_HEAD_BYTES, NIFTI_HEAD, gunzip_prefix, nifti_version, quiet
from service.inputs.volume import InputHeader, Member, Volume, repair_non_finite, storage_dtype

_UNSCALED_KEPT = (np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.uint16))


@dataclass(frozen=True)
class _Layout:
    header: Nifti1Header
    shape: tuple[int, int, int]  # (x, y, z), trailing unit dimensions dropped
    dtype: np.dtype  # as stored, byte order included
    offset: int
    end: int  # offset + data bytes: all of the file a reader needs

    @property
    def rgb(self) -> bool:
        return self.dtype.names is not None


def _parse_header(member: Member) -> Nifti1Header:
    """From the file's first bytes alone (the gateway may hold a spooled 150 MB volume: it reads no more)."""
    with member.open() as fp:
        if member.kind == "nifti-gz":
            head = bytes(gunzip_prefix(fp.read(GZIP_HEAD_BYTES), NIFTI_HEAD, member.label))
        else:
            head = fp.read(NIFTI_HEAD)
    version = nifti_version(head)
    if version is None:
        raise InvalidImage(f"{member.label}: NIfTI header is truncated")
    klass = Nifti1Header if version == 1 else Nifti2Header
    try:
        with quiet():
            return klass.from_fileobj(io.BytesIO(head[: klass.sizeof_hdr]), check=True)
    except Exception as exc:
        raise InvalidImage(f"{member.label}: invalid NIfTI header ({type(exc).__name__})") from exc


def _check_dtype(dtype: np.dtype, what: str) -> None:
    if dtype.names is not None:
        if tuple(dtype.names[:3]) != ("R", "G", "B") or any(dtype[n] != np.uint8 for n in dtype.names):
            raise InvalidImage(f"{what}: unsupported structured voxel type")
    elif dtype.kind not in "uif" or (dtype.kind == "f" and dtype.itemsize > 8):
        raise InvalidImage(f"{what}: voxels of type {dtype.name} are not an image (complex or unknown)")


def _layout(member: Member, limits: LimitSettings) -> _Layout:
    """The header's declarations, refused when over a limit, before a voxel is read."""
    header = _parse_header(member)
    what = member.label
    try:
        dims = tuple(int(n) for n in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        offset = int(header.get_data_offset())
    except ServiceError:
        raise
    except Exception as exc:
        raise InvalidImage(f"{what}: invalid NIfTI header ({type(exc).__name__})") from exc
    if len(dims) < 2 or any(n <= 0 for n in dims):
        raise InvalidImage(f"{what}: the header declares no 2D or 3D image (dimensions {dims})")
    if any(n > 1 for n in dims[3:]):
        raise InvalidImage(f"{what}: a {len(dims)}D image with dimensions {dims}; send one 2D or 3D volume")
    x, y = dims[0], dims[1]
    z = dims[2] if len(dims) > 2 else 1
    if x * y > limits.max_pixels_per_slice:
        raise ImageTooLarge(f"{what}: {y} x {x} pixels per slice, the limit is {limits.max_pixels_per_slice}")
    if z > limits.max_slices:
        raise ImageTooLarge(f"{what}: {z} slices, the limit is {limits.max_slices}")
    if x * y * z > limits.max_voxels:
        raise ImageTooLarge(f"{what}: {x * y * z} voxels, the limit is {limits.max_voxels}")
    _check_dtype(dtype, what)
    if offset < header.sizeof_hdr:
        raise InvalidImage(f"{what}: the data offset lies inside the header")
    end = offset + x * y * z * dtype.itemsize
    if member.kind == "nifti-gz" and end > limits.expansion_bound(member.size):
        raise ImageTooLarge(
            f"{what}: declares {end} bytes from {member.size} compressed, more than the allowed "
            f"{limits.max_expansion_ratio}:1 expansion beyond {limits.expansion_floor_bytes} bytes"
        )
    if member.kind == "nifti" and member.size < end:
        raise InvalidImage(f"{what}: truncated ({member.size} bytes, the header declares {end})")
    return _Layout(header, (x, y, z), dtype, offset, end)


def probe(member: Member, limits: LimitSettings, modality_hint: str | None) -> InputHeader:
    layout = _layout(member, limits)
    x, y, z = layout.shape
    return InputHeader("nifti", modality_hint, (z, y, x), 3 if layout.rgb else 1, 1, None)


# --------------------------------------------------------------------------------------------------- voxels


def _integral(value: float) -> bool:
    return math.isfinite(value) and float(value).is_integer()


def _rgb(src: np.ndarray) -> np.ndarray:
    out = np.empty((*src.shape, 3), np.uint8)
    for channel, name in enumerate("RGB"):
        out[..., channel] = src[name]
    return out


def _grey(src: np.ndarray, slope: float | None, inter: float | None, owned: bool, what: str) -> np.ndarray:
    """Voxels after scl_slope/scl_inter in the contract's dtypes: integers stay integers when the scaling is integral
    (or absent), everything else is float32; computed slice by slice so no float64 copy of the volume exists."""
    slope = 1.0 if slope is None else float(slope)
    inter = 0.0 if inter is None else float(inter)
    native = src.dtype.newbyteorder("=")
    if src.dtype.kind in "ui" and _integral(slope) and _integral(inter):
        if slope == 1 and inter == 0 and native in _UNSCALED_KEPT:
            return src if owned and src.dtype.isnative else src.astype(native)
        s, b = int(slope), int(inter)
        ends = (int(src.min()) * s + b, int(src.max()) * s + b)
        target = storage_dtype(min(ends), max(ends))
        if target.kind != "f":
            out = np.empty(src.shape, target)
            for k, plane in enumerate(src):
                out[k] = plane.astype(np.int64) * s + b
            return out
    if not (math.isfinite(slope) and math.isfinite(inter)):
        raise InvalidImage(f"{what}: scl_slope or scl_inter is not finite")
    scaled = slope != 1 or inter != 0
    if not scaled and owned and src.dtype == np.float32 and src.dtype.isnative:
        out = src
    else:
        out = np.empty(src.shape, np.float32)
        for k, plane in enumerate(src):
            out[k] = plane.astype(np.float64) * slope + inter if scaled else plane
    if out.dtype.kind == "f":
        repair_non_finite(out, what)
    return out


def _spacing(header: Nifti1Header) -> tuple[float, float, float] | None:
    """(z, y, x) from pixdim; a 2D image's unset slice thickness is taken as 1 mm, as NIfTI writers default it."""
    zx, zy, zz = (abs(float(v)) for v in header["pixdim"][1:4])
    if len(header.get_data_shape()) < 3 and not zz > 0:
        zz = 1.0
    spacing = (zz, zy, zx)
    return spacing if all(math.isfinite(v) and v > 0 for v in spacing) else None


def _orientation(affine: np.ndarray) -> str | None:
    try:
        codes = aff2axcodes(affine)
    except Exception:
        return None
    return "".join(codes) if all(codes) else None


def decode(member: Member, limits: LimitSettings, modality_hint: str | None) -> Volume:
    layout = _layout(member, limits)
    what = member.label
    data = member.read()
    if member.kind == "nifti-gz":
        buffer: bytearray | bytes = gunzip_prefix(data, layout.end, what)
        if len(buffer) < layout.end:
            raise InvalidImage(f"{what}: truncated ({len(buffer)} bytes inflated, the header declares {layout.end})")
    else:
        buffer = data
    x, y, z = layout.shape
    try:
        with quiet():
            raw = np.frombuffer(buffer, layout.dtype, count=x * y * z, offset=layout.offset)
            src = raw.reshape((x, y, z), order="F").T  # [z, y, x]; C-contiguous because NIfTI stores x fastest
            slope, inter = layout.header.get_slope_inter()
            owned = isinstance(buffer, bytearray)
            pixels = _rgb(src) if layout.rgb else _grey(src, slope, inter, owned=owned, what=what)
            affine = np.array(layout.header.get_best_affine(), dtype=np.float64)
            spacing = _spacing(layout.header)
    except ServiceError:
        raise
    except Exception as exc:  # a header nibabel parsed but cannot turn into scaling or an affine
        raise InvalidImage(f"{what}: inconsistent NIfTI header ({type(exc).__name__})") from exc
    return Volume(
        pixels=pixels,
        format="nifti",
        modality=modality_hint,
        spacing=spacing,
        orientation=_orientation(affine),
        affine=affine,
    )
