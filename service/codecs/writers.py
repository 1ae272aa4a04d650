"""File outputs beside the JSON: a NIfTI labelmap on the input's grid and a PNG overlay to look at.

Masks are held as [Z, Y, X] (slice, row, column); NIfTI stores voxels as [i, j, k] = [column, row,
slice], so the labelmap is the transpose and its affine is the input's own (NIfTI inputs) or the one
built from the DICOM geometry, turned from DICOM's LPS world into NIfTI's RAS.
"""

from __future__ import annotations

import gzip
import io
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from PIL import Image

from service import preprocess

if TYPE_CHECKING:
    from service.pipeline import Segmentation

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
OVERLAY = np.array([255, 48, 48], dtype=np.float32)
ALPHA = 0.45


def nifti_affine(segmentation: Segmentation) -> np.ndarray:
    volume = segmentation.volume
    if volume.affine is not None:
        affine = np.asarray(volume.affine, dtype=np.float64)
        return LPS_TO_RAS @ affine if volume.format == "dicom" else affine
    spacing = volume.spacing or (1.0, 1.0, 1.0)
    return np.diag([spacing[2], spacing[1], spacing[0], 1.0])


def nifti(segmentation: Segmentation) -> bytes:
    """uint8 labelmap (1 = foreground) as .nii.gz bytes."""
    if segmentation.masks is None:
        raise ValueError("the pipeline ran without keep_masks=True")
    image = nib.Nifti1Image(np.ascontiguousarray(segmentation.masks.transpose(2, 1, 0)), nifti_affine(segmentation))
    image.header.set_data_dtype(np.uint8)
    image.header["descrip"] = b"c2p-serve segmentation"
    buffer = io.BytesIO()
    file_map = image.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    return gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0)


def overlay_png(segmentation: Segmentation, index: int | None = None) -> bytes:
    """The slice with the largest mask (or ``index``) with the mask blended in red."""
    if segmentation.masks is None:
        raise ValueError("the pipeline ran without keep_masks=True")
    masks = segmentation.masks
    if index is None:
        index = int(masks.reshape(len(masks), -1).sum(1).argmax())
    if not 0 <= index < len(masks):
        raise ValueError(f"slice {index} outside 0..{len(masks) - 1}")
    plan = segmentation.result.input.preprocessing
    unit = preprocess.to_unit(segmentation.volume.pixels[index], plan)
    rgb = (np.repeat(unit[..., None], 3, axis=-1) if unit.ndim == 2 else unit) * 255
    mask = masks[index].astype(bool)
    rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * OVERLAY
    buffer = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
