"""A DICOM SEG's source headers as highdicom accepts them: which sources it gets, how the masks map onto them, and
views that smooth over what its strict reading refuses.

highdicom wants more than the service's DICOM reader accepted: exactly equal orientations, pixel spacing and
orientation in a multi-frame source's shared functional groups, every Type 2 patient and study attribute, dates and
times in their current form, a SliceThickness beside every plane position. A series the reader took must still get
its SEG, so equivalent values are brought into that form here, in views (a source itself is never changed), and only
what really cannot be one SEG is refused (``InvalidRequest``, whose message names no header value). Kept apart from
the SEG's assembly (``service.outputs.dicom_seg``) because it is the part that follows scanners' quirks.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from service.errors import InvalidRequest
from service.outputs.dicom_headers import shallow_view

# highdicom reads these from the first source without a default; Type 2 in image IODs, yet not always present.
_TYPE2_PATIENT_STUDY = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
_ORIENTATION_TOLERANCE = 1e-3  # the DICOM reader's: sources this close share one orientation

Slice = tuple[int, int | None]


def frame_count(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest("a source instance's NumberOfFrames is not a number") from exc


def layout(sources: Sequence[Dataset], slices: Sequence[Slice], depth: int) -> tuple[list[int], list[int] | None]:
    """Which sources highdicom gets, and how the masks map onto them.

    Returns (source indices in slice order, None) for a series of single-frame instances, the masks staying as
    they are; or ([the instance], frame index per slice) for one multi-frame instance, whose SEG pixel array must
    follow the source's own frame order (highdicom pairs plane i with frame i + 1)."""
    if len(slices) != depth:
        raise ValueError(f"{len(slices)} slice references for {depth} mask slices")
    for index, frame in slices:
        if not 0 <= index < len(sources):
            raise ValueError(f"slice reference to source {index}, but there are {len(sources)} sources")
        if frame is not None and not 1 <= frame <= frame_count(sources[index]):
            raise ValueError(f"slice reference to frame {frame} of a {frame_count(sources[index])}-frame source")
    instances = list(dict.fromkeys(index for index, _ in slices))
    if len(instances) == len(slices) and all(frame_count(sources[i]) == 1 for i in instances):
        return instances, None
    if len(instances) == 1:
        if any(frame is None for _, frame in slices):
            raise ValueError("slices of a multi-frame source must name their frame")
        frames = [frame - 1 for _, frame in slices]  # type: ignore[operator]
        if len(set(frames)) != len(frames):
            raise ValueError("two slices reference the same source frame")
        return instances, frames
    if any(frame is not None for _, frame in slices):
        raise InvalidRequest(
            f"the slices come from {len(instances)} multi-frame instances; a DICOM SEG can be derived from one "
            "multi-frame instance or from a series of single-frame instances"
        )
    raise ValueError("slices must reference distinct single-frame instances, or frames of one multi-frame instance")


def _attribute_of(keyword: str) -> str:
    return "PixelSpacing" if keyword == "PixelMeasuresSequence" else "ImageOrientationPatient"


def _agree(keyword: str, items: list[Dataset]) -> bool:
    """Whether every frame's pixel spacing (or orientation) is the first frame's, within the tolerance highdicom (or
    the DICOM reader) uses; read as numbers, since one number can be written in several ways."""
    rtol, atol = (1e-4, 0.0) if keyword == "PixelMeasuresSequence" else (0.0, _ORIENTATION_TOLERANCE)
    values = [[float(v) for v in item[_attribute_of(keyword)].value] for item in items]
    if len({len(v) for v in values}) != 1:
        return False
    array = np.asarray(values)
    return bool(np.allclose(array, array[0], rtol=rtol, atol=atol))


def _shared_groups_filled(ds: Dataset) -> Dataset:
    """highdicom reads a multi-frame source's pixel spacing and orientation from its shared functional groups only;
    many scanners (Philips' enhanced MR among them) repeat identical values in every frame's groups instead, which
    the standard treats as the same thing. Those are copied into the shared groups of a view (the source itself is
    left as it is); values that really differ between frames cannot become one SEG and are refused."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if per_frame is None or not len(per_frame):
        return ds
    shared_item = Dataset(dict(shared[0].items())) if shared is not None and len(shared) else Dataset()
    changed = False
    for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if keyword in shared_item:
            continue
        items = [frame.get(keyword) for frame in per_frame]
        if any(item is None or not len(item) or _attribute_of(keyword) not in item[0] for item in items):
            continue  # missing from some frame: nothing to share; highdicom then says what it lacks
        if not _agree(keyword, [item[0] for item in items]):
            what = "pixel spacing" if keyword == "PixelMeasuresSequence" else "orientation"
            raise InvalidRequest(f"the multi-frame source's frames differ in {what}; a DICOM SEG needs one")
        shared_item.add(DataElement(Tag(keyword), "SQ", [copy.deepcopy(items[0][0])]))
        changed = True
    if not changed:
        return ds
    view = shallow_view(ds)
    view.add(DataElement(Tag("SharedFunctionalGroupsSequence"), "SQ", [shared_item]))
    return view


def _date(value: object) -> str | None:
    """A DA value highdicom accepts: YYYYMMDD, also from the retired YYYY.MM.DD form; anything else is left empty
    (these are Type 2) rather than failing the whole SEG on a header quirk."""
    digits = str(value).strip().replace(".", "").replace("-", "")
    return digits if re.fullmatch(r"\d{8}", digits) else None


def _time(value: object) -> str | None:
    """A TM value highdicom accepts: HHMMSS.FFFFFF, also from the retired HH:MM:SS form; else empty."""
    text = str(value).strip().replace(":", "")
    return text if re.fullmatch(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?", text) else None


def _first_source(ds: Dataset, thickness: float | None) -> Dataset:
    """A view of the first source holding what highdicom reads from it without a default or parses strictly: the
    Type 2 patient and study attributes (empty when absent, as Type 2 allows), dates and times in their current
    form, and, for a single-frame source with a position, a SliceThickness (the SEG's pixel measures need one
    wherever there is a frame of reference; ``thickness`` is the series' own spacing when the source has none)."""
    changes: dict[str, object] = {keyword: None for keyword in _TYPE2_PATIENT_STUDY if keyword not in ds}
    for keyword, parse in (("StudyDate", _date), ("PatientBirthDate", _date), ("StudyTime", _time)):
        value = ds.get(keyword)
        if value not in (None, "") and parse(value) != str(value):
            changes[keyword] = parse(value)
    if "ImagePositionPatient" in ds and not ds.get("SliceThickness") and thickness:
        changes["SliceThickness"] = thickness
    if not changes:
        return ds
    view = shallow_view(ds)
    for keyword, value in changes.items():
        view.add_new(keyword, dictionary_VR(keyword), value)  # a new element: the source's stays as it was
    return view


def _along_normal(images: list[Dataset]) -> np.ndarray | None:
    """Single-frame sources' positions projected on their slice normal, or None without plane geometry."""
    orientation = images[0].get("ImageOrientationPatient")
    if orientation is None or any("ImagePositionPatient" not in image for image in images):
        return None
    cosines = np.asarray([float(v) for v in orientation])
    normal = np.cross(cosines[:3], cosines[3:])
    return np.asarray([[float(v) for v in image.ImagePositionPatient] for image in images]) @ normal


def _thickness(images: list[Dataset]) -> float | None:
    """What stands in for a missing SliceThickness: the median gap between the series' slices, else the declared
    SpacingBetweenSlices; None for a lone slice that declares neither."""
    along = _along_normal(images)
    if along is not None and len(along) > 1:
        gap = float(f"{np.median(np.abs(np.diff(np.sort(along)))):.6g}")  # a DS holds 16 characters
        if gap > 0:
            return gap
    spacing = images[0].get("SpacingBetweenSlices")
    return abs(float(spacing)) if spacing else None


def _aligned_orientations(images: list[Dataset]) -> list[Dataset]:
    """highdicom wants every single-frame source's ImageOrientationPatient to be exactly equal; the service's
    reader accepted the series with a tolerance, so near-equal ones are replaced by the first in views."""
    first = images[0].get("ImageOrientationPatient")
    if first is None or len(images) == 1:
        return images
    reference = np.asarray([float(v) for v in first])
    out = [images[0]]
    for image in images[1:]:
        value = image.get("ImageOrientationPatient")
        if value is None:
            raise InvalidRequest("some source instances have an orientation and others none")
        if list(value) == list(first):
            out.append(image)
            continue
        if not np.allclose([float(v) for v in value], reference, atol=_ORIENTATION_TOLERANCE):
            raise InvalidRequest("the source instances differ in orientation; a DICOM SEG needs one")
        view = shallow_view(image)
        view.add_new("ImageOrientationPatient", "DS", list(first))  # replaces the element in the view only
        out.append(view)
    return out


def position_of(ds: Dataset, frame: int | None) -> list[float] | None:
    """ImagePositionPatient of a single-frame source, or of frame ``frame`` (0-based) of a multi-frame one."""
    if frame is None:
        value = ds.get("ImagePositionPatient")
        return [float(v) for v in value] if value is not None else None
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        item = groups[frame] if len(groups) > 1 else groups[0]
        planes = item.get("PlanePositionSequence")
        if planes and "ImagePositionPatient" in planes[0]:
            return [float(v) for v in planes[0].ImagePositionPatient]
    return None


def source_images(sources: Sequence[Dataset], instances: list[int], frames: list[int] | None) -> list[Dataset]:
    """The sources ``layout`` chose, in its order, as highdicom accepts them: views where a source needed changing."""
    images = [sources[i] for i in instances]
    images = _aligned_orientations(images) if frames is None else [_shared_groups_filled(images[0])]
    images[0] = _first_source(images[0], _thickness(images) if frames is None else None)
    return images
