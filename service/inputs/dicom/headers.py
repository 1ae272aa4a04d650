"""One DICOM file's header, read cheaply and checked: an image, within the limits, decodable by what is installed,
not truncated.

Every check that needs only the header is made here, before any pixel is read: large values (pixel data, overlays,
big private blobs) stay in the file, so refusing an oversized, truncated or undecodable upload costs milliseconds and
no memory, and the gateway's probe makes the same checks as the worker's decode. What a header declares is kept as
plain values (``Header``) rather than the dataset, which may hold an open stream. Error messages name files, never
header values: headers carry patient data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from service.config import LimitSettings
from service.errors import ImageTooLarge, InvalidImage, ServiceError, UnsupportedTransferSyntax
from service.inputs.sniff import inflated_size, quiet
from service.inputs.volume import Member

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


@dataclass
class Header:
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


# SOP classes a study carries beside its images that hold no image to segment: structured reports and key object
# selections (.88), presentation states (.11), segmentations and other derived data (.66), RT objects (.481),
# encapsulated documents (.104). A PACS sends them with the study; refusing them would fail its whole send.
NON_IMAGE_CLASSES = tuple(f"1.2.840.10008.5.1.4.1.1.{family}." for family in ("88", "11", "66", "481", "104"))


def holds_image(ds: Any) -> bool:
    """Whether an instance holds pixels to segment: not a non-image SOP class, and with Rows and Columns."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    return not sop_class.startswith(NON_IMAGE_CLASSES) and "Rows" in ds and "Columns" in ds


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


def _native_bytes(h: Header, bits_allocated: int) -> int:
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


def _check_pixel_length(element: RawDataElement | DataElement, expected: int, h: Header, deflated: bool) -> None:
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


def _extract(ds: Dataset, member: Member, limits: LimitSettings, deflated: bool) -> Header:
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
    header = Header(
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


def read_header(member: Member, limits: LimitSettings) -> Header:
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
