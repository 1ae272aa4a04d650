"""A DICOM series assembled into one volume: its files checked against each other, its slices ordered along the
normal, and its spacing and patient-frame affine derived.

Consistency, order and geometry are settled on the headers alone, so a mixed or oversized series is refused before
the output is allocated; only then is each file read in full and decoded, one at a time, so peak memory is the
volume plus one file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import aff2axcodes

from service.config import LimitSettings
from service.errors import ImageTooLarge, InvalidImage
from service.inputs.dicom.headers import Header, read_header
from service.inputs.dicom.pixels import GreyStore, decode_file
from service.inputs.dicom.spacing import check_positions
from service.inputs.volume import InputHeader, Member, Volume, repair_non_finite

# Axis codes in DICOM's patient frame: each world axis as (towards negative, towards positive).
LPS_LABELS = (("R", "L"), ("A", "P"), ("I", "S"))


def _check_series(headers: list[Header], limits: LimitSettings) -> None:
    first = headers[0]
    seen: dict[str, str] = {}
    for h in headers:
        if h.uids["series_uid"] != first.uids["series_uid"]:
            raise InvalidImage(
                f"mixed series: {h.label} belongs to another series than {first.label}; name the one to segment "
                "with series_uid"
            )
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


def select(members: list[Member], limits: LimitSettings, series_uid: str) -> list[Member]:
    """The members of one series out of an upload that holds several (a study's zip, a PACS export folder), by
    SeriesInstanceUID; InvalidImage when none belongs to it. Headers only, as everything before decode."""
    chosen, others = [], set()
    for member in members:
        uid = read_header(member, limits).uids["series_uid"]
        if uid == series_uid:
            chosen.append(member)
        else:
            others.add(uid)
    if not chosen:
        raise InvalidImage(f"no file of the upload belongs to the series named; it holds {len(others)} other series")
    return chosen


def probe(members: list[Member], limits: LimitSettings, modality_hint: str | None) -> InputHeader:
    headers = [read_header(m, limits) for m in members]
    _check_series(headers, limits)
    _order(headers, limits.slice_spacing_tolerance)  # a 4D, gapped or irregular series is refused at the gateway
    first = headers[0]
    return InputHeader(
        format="dicom",
        modality=first.modality or modality_hint,
        shape=(sum(h.frames for h in headers), first.rows, first.columns),
        channels=3 if first.colour else 1,
        files=len(headers),
        transfer_syntax=first.transfer_syntax,
        series_uid=first.uids["series_uid"],
    )


@dataclass
class _Order:
    slices: list[tuple[int, int]]  # (file, frame) per output slice
    by_position: bool
    positions: list[np.ndarray | None]  # in output order
    step: float | None  # median distance between slices along the normal


def _order(headers: list[Header], tolerance: float) -> _Order:
    """Slices sorted along the slice normal when every one has a position, never by InstanceNumber then; a series
    that is not one regular volume along it (repeated positions, a gap, irregular steps: spacing.py) or whose
    slices are not parallel is refused. Without positions: by InstanceNumber, else in upload and frame order."""
    entries = [(i, f) for i, h in enumerate(headers) for f in range(h.frames)]
    positions = [headers[i].positions[f] for i, f in entries]
    orientation = headers[0].orientation
    placed = orientation is not None and all(p is not None for p in positions)
    if placed and len(entries) > 1:
        for h in headers:
            if h.orientation is None or not np.allclose(h.orientation, orientation, atol=1e-3):
                raise InvalidImage(
                    f"mixed orientations: {h.label}'s slices are not parallel to {headers[0].label}'s "
                    "(ImageOrientationPatient); send each plane as its own series"
                )
        normal = np.cross(orientation[:3], orientation[3:])  # type: ignore[index]
        along = [float(p @ normal) for p in positions]  # type: ignore[operator]
        keys = sorted(range(len(entries)), key=lambda k: (along[k], k))
        step = check_positions([along[k] for k in keys], tolerance)
        return _Order([entries[k] for k in keys], True, [positions[k] for k in keys], step)
    usable = placed
    if all(h.instance_number is not None for h in headers):
        keys = sorted(range(len(entries)), key=lambda k: (headers[entries[k][0]].instance_number, entries[k][1], k))
    else:
        keys = list(range(len(entries)))
    return _Order([entries[k] for k in keys], usable and len(entries) == 1, [positions[k] for k in keys], None)


def _geometry(first: Header, order: _Order) -> tuple[tuple[float, float, float] | None, np.ndarray | None, str | None]:
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


def decode(members: list[Member], limits: LimitSettings, modality_hint: str | None) -> Volume:
    headers = [read_header(m, limits) for m in members]
    _check_series(headers, limits)
    order = _order(headers, limits.slice_spacing_tolerance)
    first = headers[order.slices[0][0]]
    shape = (len(order.slices), first.rows, first.columns)
    slot = {entry: z for z, entry in enumerate(order.slices)}
    colour = first.colour
    rgb = np.empty((*shape, 3), np.uint8) if colour else None
    grey = None if colour else GreyStore(headers, shape)
    # Each instance's header without pixels: what a DICOM SEG must reference and copy.
    kept = [decode_file(h, i, slot, rgb, grey) for i, h in enumerate(headers)]
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
