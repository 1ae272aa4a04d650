"""DICOM SEG output: the mask as a BINARY Segmentation object that references the source series, built with highdicom.

Pure functions. The worker keeps each source instance's header without its pixels (``header_only``), stores the
headers as Part 10 bytes beside the job (``encode_headers``), reads them back as untrusted input
(``decode_headers``), and builds the SEG from them, the masks in the service's slice order and the result
(``dicom_seg``).

Geometry is never recomputed here: highdicom copies plane positions, orientation and pixel spacing from the source
headers and references, per frame, the source instance (and frame, for a multi-frame source) the frame was derived
from, so a viewer lays the SEG exactly over the input. Only slices with foreground become frames
(``omit_empty_frames``): a 300-slice CT with a small organ stores a few dozen 1-bit frames. A result without any
foreground still yields a valid SEG, with one empty frame on the first slice: a PACS user then sees that the model
ran and found nothing, and how reliable that is, rather than a missing object or an error (highdicom itself would
store every slice as an empty frame).

Where the reliability goes, and why there:

- ``SeriesDescription``, ``ContentDescription`` and the segment's ``SegmentDescription`` carry the overall score and
  level ("c2p reliability 0.83 (high)"): PACS series lists and viewers' segment panels show these, so a reader sees
  the score without any tool.
- Each frame's ``FrameContentSequence`` item has ``FrameComments`` with its slice's score: a standard attribute
  (Frame Content macro, Type 3), so per-slice scores sit on the frames they describe without a private tag.
- Slices without foreground have no frame, yet their scores matter (a low score on an empty slice says the model may
  have missed something), so the complete per-slice record is also in a private block, creator ``C2P-SERVE`` in
  group 0x0011 (the ``PRIVATE_*`` offsets): one item per slice in the service's slice order, each naming its source
  instance (and frame) with the standard reference attributes, so a program needs neither the slice order nor the
  JSON result to use it. A private block is the only conformant place for data the standard has no attribute for
  (dciodvfy reports its elements as unrecognised, a warning, never an error); the standard alternative, an SR
  measurement report beside the SEG, is a second object to store, forward and keep in step.

The segment is coded with the concept the model read out (``result.concept``: SNOMED CT category and type from
pydicom's code dictionary, models/concepts.py) and labelled with its name; only a concept the model cannot name
("unknown") falls back to the generic "Tissue" category and type, labelled with the model's name. AUTOMATIC, with
an Algorithm Identification (family Artificial Intelligence, name and version of the model, source c2p-serve, the
engine and the artifact digest as parameters). SeriesDescription and ContentDescription begin with
"RESEARCH USE ONLY" and the SegmentDescription carries the card's intended use, so no viewer shows the mask
without it.
"""

from __future__ import annotations

import copy
import importlib.metadata
import io
import re
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.spatial import get_image_coordinate_system
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from service.codecs.dicom_headers import REQUIRED_KEYWORDS, quiet, shallow_view
from service.errors import InvalidRequest
from service.schema import SegmentationResult, SliceReliability


def _package_version() -> str:
    try:
        return importlib.metadata.version("c2p-serve")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


SOFTWARE_VERSION = _package_version()
CONTENT_LABEL = "C2P_SEG"
SOURCE = "c2p-serve"
# A universal model segments whatever concept it was trained on; the SEG cannot name an organ it does not know, so
# the segment is the generic "Tissue" (CID 7150 category, CID 7151 type) and its label names the model.
SEGMENT_CATEGORY = codes.cid7150.Tissue
SEGMENT_TYPE = codes.cid7151.Tissue

PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "C2P-SERVE"
# Element offsets in the C2P-SERVE block: (0011,xxYY) where xx is the block its creator reserves.
PRIVATE_SCORE = 0x01  # FD: the overall reliability score, 0..1
PRIVATE_LEVEL = 0x02  # LO: high, medium or low
PRIVATE_DIGEST = 0x03  # LO: sha256 of the served model artifact
PRIVATE_SLICES = 0x10  # SQ: one item per slice, in the service's slice order (sorted along the normal)
# In each slice item, beside ReferencedSOPClassUID, ReferencedSOPInstanceUID and (multi-frame) ReferencedFrameNumber:
PRIVATE_SLICE_SCORE = 0x11  # FD
PRIVATE_SLICE_LEVEL = 0x12  # LO
PRIVATE_SLICE_SUPPRESSED = 0x13  # CS YES/NO: the empty gate or the volume check removed this slice's mask
PRIVATE_SLICE_OUTLIER = 0x14  # CS YES/NO: geometry out of line with the neighbouring slices

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
_LO = 64  # characters in an LO value
_ST = 1024  # characters in an ST value

Slice = tuple[int, int | None]


# ------------------------------------------------------------------------------------------- source layout


def _frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest("a source instance's NumberOfFrames is not a number") from exc


def _layout(sources: Sequence[Dataset], slices: Sequence[Slice], depth: int) -> tuple[list[int], list[int] | None]:
    """Which sources highdicom gets, and how the masks map onto them.

    Returns (source indices in slice order, None) for a series of single-frame instances, the masks staying as
    they are; or ([the instance], frame index per slice) for one multi-frame instance, whose SEG pixel array must
    follow the source's own frame order (highdicom pairs plane i with frame i + 1)."""
    if len(slices) != depth:
        raise ValueError(f"{len(slices)} slice references for {depth} mask slices")
    for index, frame in slices:
        if not 0 <= index < len(sources):
            raise ValueError(f"slice reference to source {index}, but there are {len(sources)} sources")
        if frame is not None and not 1 <= frame <= _frames(sources[index]):
            raise ValueError(f"slice reference to frame {frame} of a {_frames(sources[index])}-frame source")
    instances = list(dict.fromkeys(index for index, _ in slices))
    if len(instances) == len(slices) and all(_frames(sources[i]) == 1 for i in instances):
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


def _position_of(ds: Dataset, frame: int | None) -> list[float] | None:
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


# ---------------------------------------------------------------------------------------------- reliability


RESEARCH_USE = "RESEARCH USE ONLY"


def _summary(result: SegmentationResult) -> str:
    return f"c2p reliability {result.reliability.score:.2f} ({result.reliability.level})"


def _coded(code: Any) -> Code:
    return Code(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _segment_codes(result: SegmentationResult) -> tuple[Code, Code, str]:
    """(category, type, label): the read-out concept, or the generic tissue code when it has no name."""
    concept = result.concept
    if concept.name in ("unknown", "no finding"):
        return SEGMENT_CATEGORY, SEGMENT_TYPE, result.model.name
    return _coded(concept.category), _coded(concept.code), concept.name


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _segment_description(result: SegmentationResult, frames: int, depth: int) -> str:
    reliability = result.reliability
    text = (
        f"{result.intended_use} {result.model.name} {result.model.version}: concept {result.concept.name!r} "
        f"(similarity {result.concept.similarity:.2f}); {_summary(result)}, the area-weighted mean over slices; "
        f"foreground on {frames} of {depth} slices"
    )
    if reliability.suppressed:
        text += "; every slice's mask was suppressed as unreliable"
    if reliability.outlier_slices:
        text += "; outlier slices " + ", ".join(str(z) for z in reliability.outlier_slices)
    return _clip(text, _ST)


def _frame_comment(score: SliceReliability) -> str:
    text = f"c2p reliability {score.score:.2f} ({score.level})"
    if score.outlier:
        text += ", outlier"
    return text


def _add_private_block(
    seg: Dataset,
    result: SegmentationResult,
    references: list[tuple[str, str, int | None]],
    scores: dict[int, SliceReliability],
) -> None:
    block = seg.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE_SCORE, "FD", float(result.reliability.score))
    block.add_new(PRIVATE_LEVEL, "LO", result.reliability.level)
    block.add_new(PRIVATE_DIGEST, "LO", _clip(result.model.digest, _LO))
    items = []
    for z, (sop_class, sop_instance, frame) in enumerate(references):
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        if frame is not None:
            item.ReferencedFrameNumber = frame
        score = scores.get(z)
        if score is not None:
            own = item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
            own.add_new(PRIVATE_SLICE_SCORE, "FD", float(score.score))
            own.add_new(PRIVATE_SLICE_LEVEL, "LO", score.level)
            own.add_new(PRIVATE_SLICE_SUPPRESSED, "CS", "YES" if score.suppressed else "NO")
            own.add_new(PRIVATE_SLICE_OUTLIER, "CS", "YES" if score.outlier else "NO")
        items.append(item)
    block.add_new(PRIVATE_SLICES, "SQ", items)


def _without_geometry(seg: Dataset, source: Dataset) -> None:
    """A SEG of a picture without plane geometry (a secondary capture, a 2D ultrasound) lines up with its source by
    reference alone. highdicom still copies the source's pixel spacing into the pixel measures, without the slice
    thickness its own reader then insists on (and the standard requires once there is a frame of reference), so
    the measures go; and the General Image module needs PatientOrientation (Type 2C) exactly when there is no plane
    orientation: the source's value, else empty."""
    for groups in (seg.get("SharedFunctionalGroupsSequence") or [], seg.get("PerFrameFunctionalGroupsSequence") or []):
        for item in groups:
            if "PixelMeasuresSequence" in item:
                del item.PixelMeasuresSequence
    orientation = source.get("PatientOrientation")
    seg.PatientOrientation = list(orientation) if orientation else None


def _comment_frames(
    seg: Dataset, where: dict[tuple[str, int | None], int], scores: dict[int, SliceReliability]
) -> None:
    """FrameComments on each frame, found through the frame's own source reference (highdicom orders frames by
    position, not by the input's order)."""
    for item in seg.PerFrameFunctionalGroupsSequence:
        derivation = item.get("DerivationImageSequence")
        if not derivation or not derivation[0].get("SourceImageSequence"):
            continue
        source = derivation[0].SourceImageSequence[0]
        uid, frame = str(source.ReferencedSOPInstanceUID), source.get("ReferencedFrameNumber")
        z = where.get((uid, int(frame) if frame is not None else None))
        if z is None and frame is not None and int(frame) == 1:  # a one-frame instance of a multi-frame IOD
            z = where.get((uid, None))
        if z is not None and z in scores:
            item.FrameContentSequence[0].FrameComments = _frame_comment(scores[z])


# -------------------------------------------------------------------------------------------------- the SEG


def dicom_seg(
    sources: Sequence[Dataset],
    masks: np.ndarray,
    slices: Sequence[Slice],
    result: SegmentationResult,
    *,
    series_number: int = 9901,
    manufacturer: str = "c2p-serve",
    software_version: str = SOFTWARE_VERSION,
    device_serial_number: str | None = None,
) -> bytes:
    """DICOM SEG (Part 10 bytes) referencing the source series and instances.

    ``sources`` are pixel-less headers in any order; ``masks`` is [Z, Y, X] in the service's slice order, and
    ``slices[z]`` names the source (index, 1-based frame or None) of mask slice z. ``device_serial_number``
    defaults to the model digest's first 16 digits: stable for a given model, and it tells two models apart.
    Raises ``InvalidRequest`` when the input cannot be expressed as a SEG (several multi-frame instances, several
    frames without plane geometry, frames that differ in spacing or orientation) and ``ValueError`` when the
    arguments contradict each other (a caller's bug)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [Z, Y, X], got shape {masks.shape}")
    depth, rows, columns = masks.shape
    if depth == 0:
        raise ValueError("no mask slices")
    for keyword in REQUIRED_KEYWORDS:
        if any(keyword not in ds for ds in sources):
            raise InvalidRequest(f"a source instance has no {keyword}; a DICOM SEG cannot reference it")
    instances, frames = _layout(sources, slices, depth)
    source = sources[instances[0]]
    if (int(source.Rows), int(source.Columns)) != (rows, columns):
        raise ValueError(f"masks are {rows} x {columns}, the source images {source.Rows} x {source.Columns}")
    binary = masks if masks.dtype == np.bool_ else masks != 0

    images = [sources[i] for i in instances]
    images = _aligned_orientations(images) if frames is None else [_shared_groups_filled(images[0])]
    images[0] = _first_source(images[0], _thickness(images) if frames is None else None)

    # Planes in the order highdicom pairs them with the sources: slice order for single-frame sources, the source's
    # own frame order for a multi-frame one.
    if frames is None:
        planes = binary
    else:
        planes = np.zeros((_frames(images[0]), rows, columns), dtype=bool)
        planes[frames] = binary
    nonempty = np.flatnonzero(binary.reshape(depth, -1).any(axis=1))
    geometry = get_image_coordinate_system(images[0]) is not None
    if not geometry and planes.shape[0] > 1:
        raise InvalidRequest(
            f"the input has {planes.shape[0]} frames without plane geometry (FrameOfReferenceUID and "
            "ImagePositionPatient), as an ultrasound cine loop has; a DICOM SEG can hold one such frame only"
        )
    plane_positions = None
    if nonempty.size == 0 and geometry:
        # highdicom would write every slice as an empty frame; one empty frame on the first slice says the same.
        position = _position_of(images[0], None if frames is None else frames[0])
        if position is not None:
            plane_positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, position)]
            planes = planes[:1]

    model = result.model
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=model.version,
        source=SOURCE,
        parameters={"engine": model.engine, "digest": model.digest},
    )
    category, kind, label = _segment_codes(result)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=_clip(label, _LO),
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    description.SegmentDescription = _segment_description(result, int(nonempty.size), depth)
    try:
        with quiet():
            seg = hd.seg.Segmentation(
                source_images=images,
                pixel_array=planes,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[description],
                series_instance_uid=generate_uid(),
                series_number=series_number,
                sop_instance_uid=generate_uid(),
                instance_number=1,
                manufacturer=_clip(manufacturer, _LO),
                manufacturer_model_name=_clip(model.name, _LO),
                software_versions=_clip(software_version, _LO),
                device_serial_number=_clip(device_serial_number or model.digest[:16], _LO),
                content_description=_clip(f"{RESEARCH_USE}; {_summary(result)}", _LO),
                content_label=CONTENT_LABEL,
                series_description=_clip(f"{RESEARCH_USE} {_summary(result)}", _LO),
                omit_empty_frames=nonempty.size > 0,  # else highdicom logs that it cannot omit them all
                plane_positions=plane_positions,
            )
    except (ValueError, TypeError, AttributeError) as exc:
        # highdicom's messages mostly describe structure (counts, missing attributes), which helps the caller; one
        # that quotes something may quote a header value, so only its type is told then.
        reason = str(exc) if not re.search(r"['\"]", str(exc)) else type(exc).__name__
        raise InvalidRequest(f"a DICOM SEG cannot be built for this input: {reason}") from exc
    if not geometry:
        _without_geometry(seg, images[0])

    scores = {s.index: s for s in result.reliability.slices}
    references = [
        (str(sources[i].SOPClassUID), str(sources[i].SOPInstanceUID), frame if frames is not None else None)
        for i, frame in slices
    ]
    where = {(uid, frame): z for z, (_, uid, frame) in enumerate(references)}
    _comment_frames(seg, where, scores)
    _add_private_block(seg, result, references, scores)
    buffer = io.BytesIO()
    with quiet():  # values copied from the source (names, dates) may be quoted in pydicom's write warnings
        dcmwrite(buffer, seg, enforce_file_format=True)
    return buffer.getvalue()
