"""DICOM SEG output: the mask as a BINARY Segmentation object that references the source series, built with highdicom.

Pure functions. The worker keeps each source instance's header without its pixels (``header_only``), stores the
headers as Part 10 bytes beside the job (``encode_headers``), reads them back as untrusted input
(``decode_headers``), and builds the SEG from them, the masks in the service's slice order and the result
(``dicom_seg``), once ``service.outputs.seg_sources`` has made the headers what highdicom accepts.

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

import hashlib
import importlib.metadata
import io
import re
import uuid
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.spatial import get_image_coordinate_system
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from service.errors import InvalidRequest
from service.outputs.dicom_headers import REQUIRED_KEYWORDS, quiet
from service.outputs.seg_sources import Slice, frame_count, layout, position_of, source_images
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

_LO = 64  # characters in an LO value
_ST = 1024  # characters in an ST value


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


def stable_uids(sources: Sequence[Dataset], masks: np.ndarray, digest: str, series_number: int) -> tuple[str, str]:
    """The SEG's SeriesInstanceUID and SOPInstanceUID, derived (2.25 UIDs from a hash, PS3.5 B.2) from what the SEG
    is made of: the source series and instances, the model's artifact digest, the series number and the masks
    themselves. The same request gives the same SEG, so a PACS that receives it twice stores it once, and a SEG
    with other content can never reuse a UID."""
    ingredients = [
        str(sources[0].SeriesInstanceUID),
        *sorted(str(ds.SOPInstanceUID) for ds in sources),
        digest,
        str(series_number),
        hashlib.sha256(np.packbits(masks.astype(bool)).tobytes() + str(masks.shape).encode()).hexdigest(),
    ]
    joined = "\n".join(ingredients)
    # pydicom's generate_uid(None, ...) ignores its entropy and draws a random UUID: a name-based UUID is stable.
    return (
        f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, joined + '/series').int}",
        f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, joined + '/instance').int}",
    )


def dicom_seg(
    sources: Sequence[Dataset],
    masks: np.ndarray,
    slices: Sequence[Slice],
    result: SegmentationResult,
    *,
    series_number: int = 9901,
    series_description: str | None = None,
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
    instances, frames = layout(sources, slices, depth)
    source = sources[instances[0]]
    if (int(source.Rows), int(source.Columns)) != (rows, columns):
        raise ValueError(f"masks are {rows} x {columns}, the source images {source.Rows} x {source.Columns}")
    binary = masks if masks.dtype == np.bool_ else masks != 0

    images = source_images(sources, instances, frames)

    # Planes in the order highdicom pairs them with the sources: slice order for single-frame sources, the source's
    # own frame order for a multi-frame one.
    if frames is None:
        planes = binary
    else:
        planes = np.zeros((frame_count(images[0]), rows, columns), dtype=bool)
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
        position = position_of(images[0], None if frames is None else frames[0])
        if position is not None:
            plane_positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, position)]
            planes = planes[:1]

    model = result.model
    series_uid, instance_uid = stable_uids(sources, binary, model.digest, series_number)
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
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=instance_uid,
                instance_number=1,
                manufacturer=_clip(manufacturer, _LO),
                manufacturer_model_name=_clip(model.name, _LO),
                software_versions=_clip(software_version, _LO),
                device_serial_number=_clip(device_serial_number or model.digest[:16], _LO),
                content_description=_clip(f"{RESEARCH_USE}; {_summary(result)}", _LO),
                content_label=CONTENT_LABEL,
                series_description=_clip(f"{RESEARCH_USE} {series_description or _summary(result)}", _LO),
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
