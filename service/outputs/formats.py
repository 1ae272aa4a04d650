"""The result's formats beyond JSON: DICOM SEG, NIfTI and PNG, made on request from what the worker kept.

The JSON result already holds the masks (RLE) and the grid (shape, spacing, affine), which is all a NIfTI labelmap
needs. Two formats need more than the result: a PNG overlay needs the picture, a DICOM SEG needs the source
instances' headers (UIDs, geometry, patient and study modules it must copy). The worker keeps exactly that when a
job ends (``kept_members``), in one value beside the result with the same lifetime (JobQueue.store_outputs):

    outputs.json        what was kept: preview shape, the DICOM slice -> (instance, frame) map
    preview/00000       each slice as the network saw its intensities (windowed to uint8), raw [Y, X] or [Y, X, 3]
    dicom/00000.dcm     each source instance's header, without pixel data (DICOM inputs only)

With ``worker.deidentify`` on, the headers stored are de-identified first (``deidentified``, PS3.15 basic profile,
service/outputs/deidentify.py), so a DICOM SEG a caller downloads carries no patient identifiers; a SEG the worker
forwards to the source PACS is made from the members as ``kept_members`` made them, which must match the patient
there.

Members are separate so the gateway reads only what one answer needs (one slice's preview for a viewer
scrolling a volume). ``render`` makes a format from the result and those members; ``c2p segment`` goes through the
same function with members made in memory, so a file written locally and one fetched from the service agree.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from service.config import SegSettings
from service.errors import InvalidImage, InvalidRequest, OutputNotAvailable, ServiceError
from service.inputs import orientation
from service.inputs.volume import Volume
from service.outputs import dicom_headers, rle, writers
from service.schema import SegmentationResult
from service.worker import preprocess

log = logging.getLogger(__name__)

FORMATS = ("json", "dicom-seg", "nifti", "png")
MEDIA_TYPES = {
    "json": "application/json",
    "dicom-seg": "application/dicom",
    "nifti": "application/gzip",
    "png": "image/png",
}
EXTENSIONS = {"json": ".json", "dicom-seg": ".seg.dcm", "nifti": ".nii.gz", "png": ".png"}
INDEX = "outputs.json"
INDEX_VERSION = 1


def preview_name(index: int) -> str:
    return f"preview/{index:05d}"


def header_name(index: int) -> str:
    return f"dicom/{index:05d}.dcm"


def check_format(value: str) -> str:
    if value not in FORMATS:
        raise InvalidRequest(f"unknown format {value!r}; choose from {', '.join(FORMATS)}")
    return value


def kept_members(volume: Volume, result: SegmentationResult) -> list[tuple[str, bytes]]:
    """What the worker keeps for the derived formats (module docstring). Runs in a thread: one pass over the
    volume, a slice at a time, so its peak is one float slice beyond the volume itself."""
    plan = result.input.preprocessing
    members: list[tuple[str, bytes]] = []
    for z in range(volume.shape[0]):
        picture = preprocess.to_unit(volume.pixels[z], plan)
        picture *= 255
        members.append((preview_name(z), np.rint(picture).astype(np.uint8).tobytes()))
    index: dict[str, Any] = {
        "version": INDEX_VERSION,
        "preview": {"shape": list(volume.shape), "channels": volume.channels},
        "dicom": None,
    }
    headers = volume.source.get("headers")
    if volume.format == "dicom" and headers:
        try:
            blobs = dicom_headers.encode_headers(headers)
        except ServiceError as err:  # the segmentation stands; only a DICOM SEG of it cannot be made
            log.warning("the source headers cannot be kept for a DICOM SEG: %s", err.message)
            index["dicom"] = {"error": err.message}
        else:
            slices = [[ref["header"], ref["frame"]] for ref in volume.source["instances"]]
            index["dicom"] = {"instances": len(headers), "slices": slices}
            members += [(header_name(i), blob) for i, blob in enumerate(blobs)]
    return [(INDEX, json.dumps(index).encode()), *members]


def deidentified(members: list[tuple[str, bytes]], volume: Volume) -> list[tuple[str, bytes]]:
    """``kept_members``' members with the DICOM headers replaced by de-identified ones, made from the volume's headers
    in the same order (one UID mapping for the series, so the slice map and the SEG's references stay consistent).
    Fails closed: headers that cannot be de-identified are dropped and the index says so, so no DICOM SEG rather
    than one with identifiers. Runs in a thread, as ``kept_members``."""
    from service.outputs.deidentify import deidentify_series  # dicom-anonymizer: loaded only where this is on

    index = json.loads(dict(members)[INDEX])
    dicom = index.get("dicom")
    if not dicom or "error" in dicom:
        return members  # no headers were kept
    others = [(name, blob) for name, blob in members if name != INDEX and not name.startswith("dicom/")]
    try:
        blobs = dicom_headers.encode_headers(deidentify_series(volume.source["headers"]))
    except Exception as exc:  # the library on an attribute it cannot handle, or a header it leaves unwritable
        # Only the type: a message may quote the value (patient data) it failed on.
        log.warning("the source headers cannot be de-identified (%s); no DICOM SEG will be kept", type(exc).__name__)
        index["dicom"] = {"error": "the source headers could not be de-identified"}
        return [(INDEX, json.dumps(index).encode()), *others]
    return [(INDEX, json.dumps(index).encode()), *others, *((header_name(i), blob) for i, blob in enumerate(blobs))]


def needed(format_: str, slice_index: int | None, result: SegmentationResult) -> Callable[[str], bool]:
    """Which kept members ``render`` will read, so the gateway fetches only those."""
    if format_ == "png":
        wanted = {INDEX, preview_name(default_slice(result) if slice_index is None else slice_index)}
        return wanted.__contains__
    if format_ == "dicom-seg":
        return lambda name: name == INDEX or name.startswith("dicom/")
    return lambda name: False


def default_slice(result: SegmentationResult) -> int:
    """The slice with the largest mask (the first slice when all are empty): what a preview should show."""
    best = max(result.mask.slices, key=lambda s: (s.area, -s.index), default=None)
    return best.index if best is not None and best.area > 0 else 0


def masks_of(result: SegmentationResult) -> np.ndarray:
    """uint8 [Z, Y, X] from the result's RLE; slices the result leaves out are empty."""
    z = result.input.shape[0]
    height, width = result.mask.size
    masks = np.zeros((z, height, width), dtype=np.uint8)
    for entry in result.mask.slices:
        if not 0 <= entry.index < z:
            raise OutputNotAvailable(f"the result's mask names slice {entry.index} of a {z}-slice input")
        masks[entry.index] = rle.decode({"size": [height, width], "counts": entry.counts})
    return masks


def render(
    format_: str,
    result: SegmentationResult,
    members: Mapping[str, bytes],
    slice_index: int | None = None,
    seg: SegSettings | None = None,
) -> bytes:
    """The result in ``format_``; ``members`` holds at least what ``needed`` named; ``seg`` names a DICOM SEG."""
    check_format(format_)
    if format_ == "json":
        return result.model_dump_json().encode()
    if format_ == "nifti":
        grid = result.input
        masks, affine = masks_of(result), writers.nifti_affine(grid.format, grid.affine, grid.spacing)
        if grid.stored_orientation:  # back on the file's own voxel grid, voxel for voxel
            masks, affine = orientation.restore(masks, affine, tuple(grid.stored_orientation))
        return writers.nifti(masks, affine)
    index = _index(members)
    if format_ == "png":
        return _png(result, members, index, slice_index)
    return _dicom_seg(result, members, index, seg or SegSettings())


def _index(members: Mapping[str, bytes]) -> dict[str, Any]:
    if INDEX not in members:
        raise OutputNotAvailable("this format needs what the worker keeps with the result, and none was kept")
    try:
        index = json.loads(members[INDEX])
    except ValueError as exc:
        raise OutputNotAvailable("the kept outputs' index cannot be read") from exc
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
        raise OutputNotAvailable("the kept outputs were written by another version of the service")
    return index


def _png(
    result: SegmentationResult, members: Mapping[str, bytes], index: dict[str, Any], slice_index: int | None
) -> bytes:
    z, height, width = result.input.shape
    if slice_index is None:
        slice_index = default_slice(result)
    if not 0 <= slice_index < z:
        raise OutputNotAvailable(f"slice {slice_index} is outside 0..{z - 1}")
    channels = int(index["preview"]["channels"])
    data = members.get(preview_name(slice_index))
    if data is None or len(data) != height * width * channels:
        raise OutputNotAvailable(f"no preview of slice {slice_index} was kept")
    picture = np.frombuffer(data, np.uint8).reshape((height, width, channels) if channels == 3 else (height, width))
    mask = np.zeros((height, width), np.uint8)
    for entry in result.mask.slices:
        if entry.index == slice_index:
            mask = rle.decode({"size": [height, width], "counts": entry.counts})
    return writers.overlay_png(picture, mask)


def _dicom_seg(
    result: SegmentationResult, members: Mapping[str, bytes], index: dict[str, Any], seg: SegSettings
) -> bytes:
    dicom = index.get("dicom")
    if result.input.format != "dicom" or not dicom:
        raise OutputNotAvailable(
            f"a DICOM SEG needs a DICOM input; this one was {result.input.format}: ask for nifti or png"
        )
    if "error" in dicom:
        raise OutputNotAvailable(f"no DICOM SEG can be made for this input: {dicom['error']}")
    from service.outputs import dicom_seg  # highdicom: loaded by the first SEG, never by a gateway that makes none

    blobs = [members.get(header_name(i)) for i in range(int(dicom["instances"]))]
    if any(blob is None for blob in blobs):
        raise OutputNotAvailable("the source instances' headers were not all kept")
    slices = [(int(i), None if f is None else int(f)) for i, f in dicom["slices"]]
    try:
        sources = dicom_headers.decode_headers(blobs)  # type: ignore[arg-type]
        return dicom_seg.dicom_seg(
            sources,
            masks_of(result),
            slices,
            result,
            series_number=seg.series_number,
            series_description=seg.series_description or None,
        )
    except (InvalidRequest, InvalidImage) as err:  # the request was fine; this input cannot be a SEG's source
        raise OutputNotAvailable(err.message) from err
