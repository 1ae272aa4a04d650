"""File outputs beside the JSON: a NIfTI labelmap on the input's grid and a PNG overlay to look at. Pure functions.

Masks are held as [Z, Y, X] (slice, row, column); NIfTI stores voxels as [i, j, k] = [column, row,
slice], so the labelmap is the transpose and its affine is the input's own (NIfTI inputs) or the one
built from the DICOM geometry, turned from DICOM's LPS world into NIfTI's RAS.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from PIL import Image

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
OVERLAY = np.array([255, 48, 48], dtype=np.float32)
ALPHA = 0.45


def nifti_affine(
    input_format: str, affine: Sequence[Sequence[float]] | np.ndarray | None, spacing: Sequence[float] | None
) -> np.ndarray:
    """The labelmap's voxel-to-RAS matrix: the input's own, in RAS; spacing alone when there is no geometry."""
    if affine is not None:
        matrix = np.asarray(affine, dtype=np.float64)
        return LPS_TO_RAS @ matrix if input_format == "dicom" else matrix
    z, y, x = spacing or (1.0, 1.0, 1.0)
    return np.diag([x, y, z, 1.0])


def nifti(masks: np.ndarray, affine: np.ndarray) -> bytes:
    """uint8 labelmap (1 = foreground) as .nii.gz bytes; ``masks`` is [Z, Y, X]."""
    image = nib.Nifti1Image(np.ascontiguousarray(masks.transpose(2, 1, 0), dtype=np.uint8), affine)
    image.header.set_data_dtype(np.uint8)
    image.header["descrip"] = b"c2p-serve segmentation"
    buffer = io.BytesIO()
    file_map = image.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    return gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0)


def overlay_png(picture: np.ndarray, mask: np.ndarray) -> bytes:
    """A uint8 slice ([Y, X] grey or [Y, X, 3] RGB, already windowed) with the mask blended in red, as PNG."""
    if picture.shape[:2] != mask.shape:
        raise ValueError(f"picture {picture.shape[:2]} and mask {mask.shape} differ in size")
    rgb = np.repeat(picture[..., None], 3, axis=-1) if picture.ndim == 2 else picture
    rgb = rgb.astype(np.float32)
    inside = mask.astype(bool)
    rgb[inside] = (1 - ALPHA) * rgb[inside] + ALPHA * OVERLAY
    buffer = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
