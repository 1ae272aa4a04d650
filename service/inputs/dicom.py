"""DICOM: single files, multi-frame files and series (several files or a zip), in every transfer syntax the installed
decoders handle: pylibjpeg's plugins first, Pillow and pydicom's own next, GDCM only for syntaxes none of them
decodes (it crashes the process on some corrupt data instead of raising).

Every file's header is read first, cheaply (large values stay unread): the limits, the series' consistency and the
slice order are settled on headers alone. Only then is the output allocated and each file read in full and decoded,
one at a time, so peak memory is the volume plus one file; compressed frames whose codestream declares other
dimensions than the header are refused before a decoder sizes its output from them. Values are rescaled into
integers whenever the rescale is integral, MONOCHROME1 is inverted (declared max + min - value) so bright means dense
everywhere downstream, and colour (RGB, YBR, palette) comes out as 8-bit RGB. Error messages name files, never
header values: headers carry patient data.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel.orientations import aff2axcodes
from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, iter_pixels, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from service.codecs.dicom_headers import header_only
from service.config import LimitSettings
from service.errors import ImageTooLarge, InvalidImage, ServiceError, UnsupportedTransferSyntax
from service.inputs.sniff import inflated_size, quiet
from service.inputs.volume import InputHeader, Member, Volume, repair_non_finite, storage_dtype

# Axis codes in DICOM's patient frame: each world axis as (towards negative, towards positive).
LPS_LABELS = (("R", "L"), ("A", "P"), ("I", "S"))

# Values above this size are left in the file while headers are read: pixel data, overlays, big private blobs.
HEADER_DEFER_BYTES = 4096
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float Pixel Data, Double Float Pixel Data
_UNDEFINED_LENGTH = 0xFFFFFFFF
_GREY = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"}
_SOP = "1.2.840.10008.5.1.4.1.1."
# SOP classes that carry no image to segment even when they hold pixel-like data (a SEG's frames are masks, a dose
# grid is not anatomy), and tiled whole-slide images, whose frames are tiles rather than slices.
_NOT_IMAGES = {
    _SOP + "66": "segmentation, registration or raw data object",
    _SOP + "88": "structured report",
    _SOP + "9": "waveform",
    _SOP + "11": "presentation state",
    _SOP + "104": "encapsulated document",
    _SOP + "481": "radiotherapy object",
    _SOP + "77.1.6": "tiled whole-slide image",
    "1.2.840.10008.1.3.10": "media directory (DICOMDIR)",
}
_IMAGE_EXCEPTIONS = {_SOP + "481.1"}  # RT Image (portal images) is an image
_NOT_IMAGE_MODALITIES = {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "PR", "KO", "REG", "DOC", "ECG"}
_DEFLATED_UID_BYTES = DeflatedExplicitVRLittleEndian.encode()
SAFE_PLUGINS = ("pylibjpeg", "pydicom", "pillow")  # in order of preference


@dataclass
class _Header:
    """What one file's header declares, as plain values (the dataset itself is not kept: it may hold a stream)."""

    member: Member
    transfer_syntax: str
    rows: int
    columns: int
    frames: int
    multiframe: bool
    samples: int
    photometric: str
    bits_stored: int
    signed: bool
    float_pixels: bool
    modality_lut: bool
    modality: str | None
    uids: dict[str, str | None]
    instance_number: int | None
    orientation: np.ndarray | None
    positions: list[np.ndarray | None]
    rescale: list[tuple[float, float]]
    window: tuple[float, float] | None
    pixel_spacing: tuple[float, float] | None
    slice_spacing: float | None

    @property
    def label(self) -> str:
        return self.member.label

    @property
    def colour(self) -> bool:
        return self.samples == 3 or self.photometric == "PALETTE COLOR"

    def stored_range(self) -> tuple[int, int]:
        if self.signed:
            return -(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1
        return 0, (1 << self.bits_stored) - 1


# ------------------------------------------------------------------------------------------ header values


def _values(value: Any) -> list[Any]:
    """pydicom gives a multi-valued element as a sequence and a single value as a scalar; strings are scalars."""
    if value is None:
        return []
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _floats(value: Any, count: int) -> np.ndarray | None:
    """A multi-valued decimal as ``count`` finite floats, or None when absent or malformed (geometry is optional)."""
    try:
        values = np.array([float(v) for v in _values(value)], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if values.shape != (count,) or not np.isfinite(values).all():
        return None
    return values


def _first_float(value: Any) -> float | None:
    """The first value of a possibly multi-valued decimal (windows often come as several), if it is a finite number."""
    values = _values(value)
    try:
        number = float(values[0]) if values and values[0] != "" else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


def _uid(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return (str(value).strip() or None) if value is not None else None


def _item(ds: Dataset | None, sequence: str) -> Dataset | None:
    """The first item of a functional-group macro, if present."""
    if ds is None:
        return None
    seq = ds.get(sequence)
    return seq[0] if seq else None


def _group_value(frame: Dataset | None, shared: Dataset | None, sequence: str, keyword: str) -> Any:
    """A value from an enhanced multi-frame's functional groups: the frame's own, else the shared one."""
    for groups in (frame, shared):
        item = _item(groups, sequence)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _rescale(slope: Any, intercept: Any, what: str) -> tuple[float, float]:
    s = 1.0 if slope in (None, "") else _first_float(slope)
    b = 0.0 if intercept in (None, "") else _first_float(intercept)
    if s is None or b is None or s == 0:
        raise InvalidImage(f"{what}: RescaleSlope or RescaleIntercept is malformed")
    return s, b


def _window(center: Any, width: Any) -> tuple[float, float] | None:
    c, w = _first_float(center), _first_float(width)
    return (c, w) if c is not None and w is not None and w > 0 else None


def _transfer_syntax(ds: Dataset) -> str:
    """The file's transfer syntax; files without meta information get the one their encoding shows."""
    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if uid:
        return str(uid)
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_decoder(ts: str, what: str) -> bool:
    """Whether the syntax is native (uncompressed); UnsupportedTransferSyntax if nothing installed decodes it."""
    uid = UID(ts)
    name = f"{ts} ({uid.name})" if uid.is_valid and uid.name != ts else ts
    try:
        decoder = get_decoder(uid)
    except Exception as exc:
        raise UnsupportedTransferSyntax(f"{what}: no decoder exists for transfer syntax {name}") from exc
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(f"{what}: no installed decoder handles transfer syntax {name}")
    return bool(decoder.is_native)


def _not_an_image(sop_class: str | None, modality: str | None) -> str | None:
    if sop_class and sop_class not in _IMAGE_EXCEPTIONS:
        for prefix, kind in _NOT_IMAGES.items():
            if sop_class == prefix or sop_class.startswith(prefix + "."):
                return kind
    if modality in _NOT_IMAGE_MODALITIES:
        return f"{modality} object"
    return None


def _meta_end(head: bytes) -> int | None:
    """Where the file meta group (always explicit VR little endian) ends: a deflated dataset starts there."""
    pos = 132 if head[128:132] == b"DICM" else 0
    while pos + 8 <= len(head):
        if int.from_bytes(head[pos : pos + 2], "little") != 2:
            return pos
        vr = head[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"):
            pos += 12 + int.from_bytes(head[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(head[pos + 6 : pos + 8], "little")
    return None


def _check_deflate(member: Member, limits: LimitSettings) -> bool:
    """pydicom inflates a deflated dataset in one unbounded call; measure the expansion first, within the limits."""
    with member.open() as fp:
        head = fp.read(8192)
    if _DEFLATED_UID_BYTES not in head:
        return False
    data = member.read()
    start = _meta_end(data[:65536])
    if start is None:
        return False
    bound = min(limits.max_upload_bytes, limits.expansion_bound(len(data)))
    if inflated_size(memoryview(data)[start:], bound, member.label) > bound:
        raise ImageTooLarge(
            f"{member.label}: the deflated dataset expands beyond {bound} bytes "
            f"(limit: {limits.max_expansion_ratio}:1 and {limits.max_upload_bytes} bytes)"
        )
    return True


def _native_bytes(h: _Header, bits_allocated: int) -> int:
    """Bytes an uncompressed pixel data element must hold."""
    samples = 2 if h.photometric == "YBR_FULL_422" else h.samples
    bits = h.rows * h.columns * h.frames * samples * bits_allocated
    return (bits + 7) // 8


def _pixel_element(ds: Dataset) -> tuple[int, RawDataElement | DataElement] | None:
    for tag in _PIXEL_TAGS:
        element = ds.get_item(tag, keep_deferred=True)
        if element is not None:
            return tag, element
    return None


def _check_pixel_length(element: RawDataElement | DataElement, expected: int, h: _Header, deflated: bool) -> None:
    """A truncated file is caught from lengths alone: the element declares too little, or runs past the file."""
    if isinstance(element, RawDataElement):
        length, end = element.length, element.value_tell + element.length
    else:
        length, end = len(element.value or b""), 0
    if length == _UNDEFINED_LENGTH:
        return
    if expected and length < expected:
        raise InvalidImage(f"{h.label}: the pixel data holds {length} bytes, {expected} are declared")
    if not deflated and end > h.member.size:
        raise InvalidImage(f"{h.label}: truncated (the pixel data runs past the end of the file)")


def _frame_geometry(ds: Dataset, frames: int, what: str) -> dict[str, Any]:
    """Orientation, per-frame positions and rescale, window and spacing, from the classic attributes or from an
    enhanced multi-frame's functional groups."""
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    per_frame = list(per_frame) if per_frame is not None and len(per_frame) == frames else None
    first = per_frame[0] if per_frame else None

    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    if orientation is None:
        orientation = _floats(_group_value(first, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    if orientation is not None and np.linalg.norm(np.cross(orientation[:3], orientation[3:])) < 1e-3:
        orientation = None

    if per_frame:
        positions = [
            _floats(_group_value(f, None, "PlanePositionSequence", "ImagePositionPatient"), 3) for f in per_frame
        ]
    else:
        position = _floats(ds.get("ImagePositionPatient"), 3)
        positions = [position if frames == 1 else None for _ in range(frames)]

    def rescale_of(frame: Dataset | None) -> tuple[float, float]:
        if "RescaleSlope" in ds or "RescaleIntercept" in ds:
            return _rescale(ds.get("RescaleSlope"), ds.get("RescaleIntercept"), what)
        seq = "PixelValueTransformationSequence"
        return _rescale(
            _group_value(frame, shared, seq, "RescaleSlope"), _group_value(frame, shared, seq, "RescaleIntercept"), what
        )

    rescale = [rescale_of(f) for f in per_frame] if per_frame else [rescale_of(None)] * frames

    window = _window(ds.get("WindowCenter"), ds.get("WindowWidth"))
    if window is None:
        seq = "FrameVOILUTSequence"
        window = _window(
            _group_value(first, shared, seq, "WindowCenter"), _group_value(first, shared, seq, "WindowWidth")
        )

    measures = "PixelMeasuresSequence"
    spacing = _floats(ds.get("PixelSpacing"), 2)
    if spacing is None:
        spacing = _floats(_group_value(first, shared, measures, "PixelSpacing"), 2)
    if spacing is None:
        spacing = _floats(ds.get("ImagerPixelSpacing"), 2)
    between = _first_float(ds.get("SpacingBetweenSlices")) or _first_float(
        _group_value(first, shared, measures, "SpacingBetweenSlices")
    )
    thickness = _first_float(ds.get("SliceThickness")) or _first_float(
        _group_value(first, shared, measures, "SliceThickness")
    )
    slice_spacing = next((v for v in (between, thickness) if v is not None and v > 0), None)
    return {
        "orientation": orientation,
        "positions": positions,
        "rescale": rescale,
        "window": window,
        "pixel_spacing": None if spacing is None or (spacing <= 0).any() else (float(spacing[0]), float(spacing[1])),
        "slice_spacing": slice_spacing,
    }


def _extract(ds: Dataset, member: Member, limits: LimitSettings, deflated: bool) -> _Header:
    what = member.label
    modality = str(ds.get("Modality") or "").strip().upper() or None
    sop_class = _uid(ds, "SOPClassUID") or (str(ds.file_meta.get("MediaStorageSOPClassUID") or "") or None)
    kind = _not_an_image(sop_class, modality)
    if kind:
        raise InvalidImage(f"{what}: a DICOM {kind}, not an image to segment")
    pixel = _pixel_element(ds)
    if pixel is None:
        raise InvalidImage(f"{what}: holds no pixel data")
    tag, element = pixel
    if "Rows" not in ds or "Columns" not in ds or "BitsAllocated" not in ds:
        raise InvalidImage(f"{what}: Rows, Columns or BitsAllocated is missing")
    rows, columns = int(ds.Rows), int(ds.Columns)
    if rows <= 0 or columns <= 0:
        raise InvalidImage(f"{what}: the header declares an empty image")
    if rows * columns > limits.max_pixels_per_slice:
        raise ImageTooLarge(f"{what}: {rows} x {columns} pixels per slice, the limit is {limits.max_pixels_per_slice}")
    multiframe = ds.get("NumberOfFrames") not in (None, "")
    try:
        frames = int(ds.NumberOfFrames) if multiframe else 1
    except (TypeError, ValueError) as exc:
        raise InvalidImage(f"{what}: NumberOfFrames is not a number") from exc
    if frames <= 0:
        raise InvalidImage(f"{what}: NumberOfFrames is not positive")
    if frames > limits.max_slices:
        raise ImageTooLarge(f"{what}: {frames} frames, the limit is {limits.max_slices} slices")
    if rows * columns * frames > limits.max_voxels:
        raise ImageTooLarge(f"{what}: {rows * columns * frames} voxels, the limit is {limits.max_voxels}")
    samples = int(ds.get("SamplesPerPixel") or 1)
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    grey_ok = samples == 1 and photometric in (*_GREY, "PALETTE COLOR")
    if not (grey_ok or (samples == 3 and photometric in _COLOUR)):
        raise InvalidImage(f"{what}: unsupported photometric interpretation with {samples} samples per pixel")
    bits_allocated = int(ds.BitsAllocated)
    if bits_allocated not in (1, 8, 16, 32, 64):
        raise InvalidImage(f"{what}: BitsAllocated {bits_allocated} is not 1, 8, 16, 32 or 64")
    bits_stored = int(ds.get("BitsStored") or bits_allocated)
    ts = _transfer_syntax(ds)
    native = _check_decoder(ts, what)
    instance = ds.get("InstanceNumber")
    try:
        instance_number = int(instance) if instance not in (None, "") else None
    except (TypeError, ValueError):
        instance_number = None
    header = _Header(
        member=member,
        transfer_syntax=ts,
        rows=rows,
        columns=columns,
        frames=frames,
        multiframe=multiframe,
        samples=samples,
        photometric=photometric,
        bits_stored=min(max(bits_stored, 1), bits_allocated),
        signed=int(ds.get("PixelRepresentation") or 0) == 1,
        float_pixels=tag != _PIXEL_TAGS[0],
        modality_lut="ModalityLUTSequence" in ds,
        modality=modality,
        uids={
            "study_uid": _uid(ds, "StudyInstanceUID"),
            "series_uid": _uid(ds, "SeriesInstanceUID"),
            "frame_of_reference_uid": _uid(ds, "FrameOfReferenceUID"),
            "sop_class_uid": sop_class,
            "sop_instance_uid": _uid(ds, "SOPInstanceUID"),
        },
        instance_number=instance_number,
        **_frame_geometry(ds, frames, what),
    )
    _check_pixel_length(element, _native_bytes(header, bits_allocated) if native else 0, header, deflated)
    return header


def read_header(member: Member, limits: LimitSettings) -> _Header:
    """One file's header, checked: an image, within the limits, decodable by what is installed, not truncated."""
    try:
        with quiet():
            deflated = _check_deflate(member, limits)
            with member.open() as fp:
                ds = dcmread(fp, force=True, defer_size=HEADER_DEFER_BYTES)
                return _extract(ds, member, limits, deflated)
    except ServiceError:
        raise
    except Exception as exc:
        raise InvalidImage(f"{member.label}: not a readable DICOM file ({type(exc).__name__})") from exc


# ------------------------------------------------------------------------------------------------- series


def _check_series(headers: list[_Header], limits: LimitSettings) -> None:
    first = headers[0]
    seen: dict[str, str] = {}
    for h in headers:
        if h.uids["series_uid"] != first.uids["series_uid"]:
            raise InvalidImage(f"mixed series: {h.label} belongs to another series than {first.label}")
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise InvalidImage(
                f"mixed series: {h.label} has {h.rows} x {h.columns} pixels, "
                f"{first.label} has {first.rows} x {first.columns}"
            )
        if h.colour != first.colour:
            raise InvalidImage(f"mixed series: {h.label} and {first.label} differ in colour")
        instance = h.uids["sop_instance_uid"]
        if instance is not None and instance in seen:
            raise InvalidImage(f"{h.label} and {seen[instance]} are the same instance")
        if instance is not None:
            seen[instance] = h.label
    slices = sum(h.frames for h in headers)
    if slices > limits.max_slices:
        raise ImageTooLarge(f"{slices} slices in the series, the limit is {limits.max_slices}")
    voxels = slices * first.rows * first.columns
    if voxels > limits.max_voxels:
        raise ImageTooLarge(f"{voxels} voxels in the series, the limit is {limits.max_voxels}")


def probe(members: list[Member], limits: LimitSettings, modality_hint: str | None) -> InputHeader:
    headers = [read_header(m, limits) for m in members]
    _check_series(headers, limits)
    first = headers[0]
    return InputHeader(
        format="dicom",
        modality=first.modality or modality_hint,
        shape=(sum(h.frames for h in headers), first.rows, first.columns),
        channels=3 if first.colour else 1,
        files=len(headers),
        transfer_syntax=first.transfer_syntax,
    )


@dataclass
class _Order:
    slices: list[tuple[int, int]]  # (file, frame) per output slice
    by_position: bool
    positions: list[np.ndarray | None]  # in output order
    step: float | None  # median distance between slices along the normal


def _order(headers: list[_Header]) -> _Order:
    """Slices sorted along the slice normal when every one has a position (and no two share one), else by
    InstanceNumber, else in upload and frame order."""
    entries = [(i, f) for i, h in enumerate(headers) for f in range(h.frames)]
    positions = [headers[i].positions[f] for i, f in entries]
    orientation = headers[0].orientation
    usable = (
        orientation is not None
        and all(h.orientation is not None and np.allclose(h.orientation, orientation, atol=1e-3) for h in headers)
        and all(p is not None for p in positions)
    )
    if usable and len(entries) > 1:
        normal = np.cross(orientation[:3], orientation[3:])  # type: ignore[index]
        along = [float(p @ normal) for p in positions]  # type: ignore[operator]
        keys = sorted(range(len(entries)), key=lambda k: (along[k], headers[entries[k][0]].instance_number or 0, k))
        gaps = np.diff([along[k] for k in keys])
        if (gaps > 1e-3).all():
            return _Order([entries[k] for k in keys], True, [positions[k] for k in keys], float(np.median(gaps)))
    if all(h.instance_number is not None for h in headers):
        keys = sorted(range(len(entries)), key=lambda k: (headers[entries[k][0]].instance_number, entries[k][1], k))
    else:
        keys = list(range(len(entries)))
    return _Order([entries[k] for k in keys], usable and len(entries) == 1, [positions[k] for k in keys], None)


def _geometry(first: _Header, order: _Order) -> tuple[tuple[float, float, float] | None, np.ndarray | None, str | None]:
    """(z, y, x) spacing and the LPS affine of voxel indices (x, y, z)."""
    z = len(order.slices)
    dz = order.step or first.slice_spacing or (1.0 if z == 1 else None)
    spacing = None
    if first.pixel_spacing is not None and dz is not None:
        spacing = (float(dz), first.pixel_spacing[0], first.pixel_spacing[1])
    if first.orientation is None or first.pixel_spacing is None or order.positions[0] is None or not order.by_position:
        return spacing, None, None
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    dy, dx = first.pixel_spacing
    origin = order.positions[0]
    # The mean step between the end slices, not the normal: a tilted gantry's slices are sheared.
    step = (order.positions[-1] - origin) / (z - 1) if z > 1 else np.cross(row_dir, col_dir) * (dz or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * dx
    affine[:3, 1] = col_dir * dy
    affine[:3, 2] = step
    affine[:3, 3] = origin  # type: ignore[assignment]
    return spacing, affine, "".join(aff2axcodes(affine, labels=LPS_LABELS))


# ------------------------------------------------------------------------------------------------- pixels


class _GreyStore:
    """The output volume for grey series. Integral rescales are stored as integers; the dtype comes from the declared
    range when that fits 16 bits, and otherwise (signed 16-bit CT with intercept -1024 is common) starts at 16 bits
    and widens only if the actual values need it (slices arrive out of order, so the range put so far is tracked)."""

    def __init__(self, headers: list[_Header], shape: tuple[int, int, int]) -> None:
        # The rescaled range the headers allow: the clip for integers, the mirror for MONOCHROME1 and its window.
        self.declared: tuple[float, float] | None = None
        if not any(h.float_pixels or h.modality_lut for h in headers):
            ends = [s * v + b for h in headers for (s, b) in set(h.rescale) for v in h.stored_range()]
            self.declared = (min(ends), max(ends))
        integral = self.declared is not None and all(
            float(v).is_integer() for h in headers for r in h.rescale for v in r
        )
        dtype = storage_dtype(*self.declared) if integral and self.declared else np.dtype(np.float32)
        if integral and self.declared and dtype.kind == "f":
            dtype = np.dtype(np.int16 if self.declared[0] < 0 else np.uint16)
        self.pixels = np.empty(shape, dtype)
        self.seen: tuple[int, int] | None = None

    def put(self, z: int, values: np.ndarray) -> None:
        if self.pixels.dtype.kind != "f":
            lo, hi = int(values.min()), int(values.max())
            self.seen = (lo, hi) if self.seen is None else (min(lo, self.seen[0]), max(hi, self.seen[1]))
            info = np.iinfo(self.pixels.dtype)
            if lo < info.min or hi > info.max:
                self.pixels = self.pixels.astype(storage_dtype(*self.seen))
        self.pixels[z] = values


def _grey_values(frame: np.ndarray, ds: Dataset, h: _Header, index: int, store: _GreyStore) -> np.ndarray:
    """One frame in rescaled units, MONOCHROME1 inverted within the declared range (so the window can be mirrored
    the same way)."""
    if h.modality_lut:
        values = np.asarray(apply_modality_lut(frame, ds), dtype=np.float32)
    elif store.pixels.dtype.kind != "f":
        slope, intercept = h.rescale[index]
        values = frame.astype(np.int64) * int(slope) + int(intercept)
        if store.declared:
            np.clip(values, int(store.declared[0]), int(store.declared[1]), out=values)
    else:
        slope, intercept = h.rescale[index]
        values = frame.astype(np.float32)
        if slope != 1 or intercept != 0:
            values = (frame.astype(np.float64) * slope + intercept).astype(np.float32)
    if h.photometric == "MONOCHROME1":
        lo, hi = store.declared if store.declared else (float(values.min()), float(values.max()))
        values = (int(lo + hi) if values.dtype.kind == "i" else np.float32(lo + hi)) - values
    return values


def _colour_values(frame: np.ndarray, ds: Dataset, h: _Header) -> np.ndarray:
    """One frame as 8-bit RGB: palettes looked up, deeper samples shifted down (YBR is already RGB: pydicom
    converts it while decoding)."""
    if h.photometric == "PALETTE COLOR":
        frame = apply_color_lut(frame, ds)
        bits = 16 if frame.dtype.itemsize > 1 else 8
    else:
        bits = h.bits_stored
    if frame.dtype.itemsize > 1 or bits > 8:
        frame = np.right_shift(frame, max(bits - 8, 0)) if frame.dtype.kind in "ui" else frame
        frame = np.clip(frame, 0, 255)
    return frame.astype(np.uint8)


def _read_full(h: _Header) -> Dataset:
    data = h.member.read()
    ds = dcmread(io.BytesIO(data), force=True)
    if not ds.file_meta.get("TransferSyntaxUID"):
        ds.file_meta.TransferSyntaxUID = UID(h.transfer_syntax)
    return ds


_JPEG_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}  # JPEG process 1-15 and JPEG-LS frame headers
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}
_SIZED_CODECS = (
    "1.2.840.10008.1.2.4.5",
    "1.2.840.10008.1.2.4.6",
    "1.2.840.10008.1.2.4.7",
    "1.2.840.10008.1.2.4.8",
    "1.2.840.10008.1.2.4.9",
    "1.2.840.10008.1.2.4.20",
)  # JPEG, JPEG-LS, JPEG 2000, HTJ2K


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """(columns, rows, components) from a JPEG or JPEG-LS frame header."""
    if frame[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF or marker in _STANDALONE:
            pos += 1 if marker == 0xFF else 2
            continue
        if marker in _JPEG_SOF:
            if pos + 10 > len(frame):
                return None
            rows, columns = (
                int.from_bytes(frame[pos + 5 : pos + 7], "big"),
                int.from_bytes(frame[pos + 7 : pos + 9], "big"),
            )
            return columns, rows, frame[pos + 9]
        if marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            return None
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    return None


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """(columns, rows, components) from a JPEG 2000 codestream's SIZ segment, inside a JP2 file or bare."""
    pos = 0
    if frame[4:8] == b"jP  ":  # JP2 boxes: find the contiguous codestream box
        while pos + 8 <= len(frame):
            length = int.from_bytes(frame[pos : pos + 4], "big")
            if frame[pos + 4 : pos + 8] == b"jp2c":
                pos += 8
                break
            if length < 8:
                return None
            pos += length
    if frame[pos : pos + 4] != b"\xff\x4f\xff\x51" or pos + 42 > len(frame):
        return None
    siz = pos + 2

    def word(offset: int) -> int:
        return int.from_bytes(frame[siz + offset : siz + offset + 4], "big")

    return word(6) - word(14), word(10) - word(18), int.from_bytes(frame[siz + 38 : siz + 40], "big")


def _check_codestreams(ds: Dataset, h: _Header) -> None:
    """JPEG, JPEG-LS and JPEG 2000 decoders size their output from the codestream, not from the DICOM header that
    the limits checked; a frame whose codestream declares other dimensions is refused before it is decoded."""
    if not h.transfer_syntax.startswith(_SIZED_CODECS):
        return
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    frames = generate_frames(ds.PixelData, number_of_frames=h.frames, extended_offsets=offsets)
    expected = (h.columns, h.rows, h.samples)
    for index, frame in zip(range(h.frames), frames, strict=False):
        size = _jpeg_size(frame) if frame[:2] == b"\xff\xd8" else _j2k_size(frame)
        if size != expected:
            raise InvalidImage(
                f"{h.label}: frame {index + 1}'s compressed data does not declare the header's "
                f"{h.rows} x {h.columns} x {h.samples} pixels"
            )


def _plugins(ts: str) -> list[str]:
    """Decoding plugins in the order tried. pydicom would try GDCM first, and GDCM crashes the process (segfault,
    abort) on some corrupt data where pylibjpeg, Pillow and pydicom raise; so GDCM only decodes syntaxes none of
    those handles."""
    available = list(get_decoder(UID(ts)).available_plugins)
    return [p for p in SAFE_PLUGINS if p in available] or available or [""]


def _decoded(ds: Dataset, h: _Header) -> Iterator[np.ndarray]:
    """Frames one at a time, from the first plugin that decodes the file. Within a plugin, pydicom's frame iterator
    fails on a few files its indexed path reads (a J2K codestream whose signedness disagrees with
    PixelRepresentation), so that is the second try."""
    failure: BaseException | None = None
    for plugin in _plugins(h.transfer_syntax):
        for by_index in (False, True):
            produced = 0
            try:
                if by_index:
                    for index in range(h.frames):
                        yield pixel_array(ds, index=index, decoding_plugin=plugin)
                        produced += 1
                else:
                    for frame in iter_pixels(ds, decoding_plugin=plugin):
                        yield frame
                        produced += 1
                return
            except BaseException as exc:
                if produced or isinstance(exc, ServiceError) or not _decoder_failed(exc):
                    raise
                failure = exc
    assert failure is not None
    raise failure


def _frames(ds: Dataset, h: _Header) -> Iterator[np.ndarray]:
    """The decoded frames of one file, each checked against the header's shape."""
    _check_codestreams(ds, h)
    expected = (h.rows, h.columns, 3) if h.samples == 3 else (h.rows, h.columns)
    count = 0
    for frame in _decoded(ds, h):
        if count >= h.frames or frame.shape != expected:
            raise InvalidImage(f"{h.label}: the decoded pixel data does not match the header's shape")
        count += 1
        yield frame
    if count != h.frames:
        raise InvalidImage(f"{h.label}: {count} frames decoded, {h.frames} declared")


def _decoder_failed(exc: BaseException) -> bool:
    """Whether an exception is a decoder rejecting its input. The Rust plugins (pylibjpeg-rle) panic on some corrupt
    data, and pyo3's PanicException derives from BaseException, so ``except Exception`` alone would let it through."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def decode(members: list[Member], limits: LimitSettings, modality_hint: str | None) -> Volume:
    headers = [read_header(m, limits) for m in members]
    _check_series(headers, limits)
    order = _order(headers)
    first = headers[order.slices[0][0]]
    shape = (len(order.slices), first.rows, first.columns)
    slot = {entry: z for z, entry in enumerate(order.slices)}
    colour = first.colour
    rgb = np.empty((*shape, 3), np.uint8) if colour else None
    grey = None if colour else _GreyStore(headers, shape)
    kept: list[Dataset] = []  # each instance's header without pixels: what a DICOM SEG must reference and copy
    for i, h in enumerate(headers):
        try:
            with quiet():
                ds = _read_full(h)
                for f, frame in enumerate(_frames(ds, h)):
                    if rgb is not None:
                        rgb[slot[(i, f)]] = _colour_values(frame, ds, h)
                    else:
                        grey.put(slot[(i, f)], _grey_values(frame, ds, h, f, grey))  # type: ignore[union-attr]
                kept.append(header_only(ds))
        except BaseException as exc:
            if isinstance(exc, ServiceError) or not _decoder_failed(exc):
                raise
            name = UID(h.transfer_syntax).name
            raise InvalidImage(f"{h.label}: the pixel data cannot be decoded ({name}, {type(exc).__name__})") from exc
    if grey is not None and any(h.float_pixels for h in headers):
        repair_non_finite(grey.pixels, first.label)
    window = first.window
    if window is not None and first.photometric == "MONOCHROME1" and grey is not None and grey.declared:
        # The header's window reads the uninverted values; mirrored, it reads the inverted ones the same way.
        window = (grey.declared[0] + grey.declared[1] - window[0], window[1])
    spacing, affine, orientation = _geometry(first, order)
    instances = [
        {
            "sop_instance_uid": headers[i].uids["sop_instance_uid"],
            "header": i,
            "frame": f + 1 if headers[i].multiframe else None,
        }
        for i, f in order.slices
    ]
    source = {key: first.uids[key] for key in ("study_uid", "series_uid", "frame_of_reference_uid", "sop_class_uid")}
    return Volume(
        pixels=rgb if rgb is not None else grey.pixels,  # type: ignore[union-attr]
        format="dicom",
        modality=first.modality or modality_hint,
        spacing=spacing,
        orientation=orientation,
        affine=affine,
        window=None if colour else window,
        photometric=first.photometric,
        source={**source, "instances": instances, "headers": kept},
    )
