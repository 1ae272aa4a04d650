"""Canonical slicing of NIfTI volumes: the model sees the same picture whatever voxel order a file was stored in.

A NIfTI file may store the same anatomy with its axes permuted and flipped (the affine says how); slicing along
the file's third axis would show the model sagittal slices of one file and axial slices of the other. So before
slicing, the voxels are reoriented (nibabel's orientation tools: permutations and flips only, never a resampling)
to the display convention the model was trained on, which is also DICOM's for the same plane:

    axial     columns towards the patient's left, rows towards posterior, slices towards superior   (L, P, S)
    coronal   columns towards the patient's left, rows towards inferior,  slices towards anterior   (L, I, A)
    sagittal  columns towards anterior,           rows towards inferior,  slices towards left       (A, I, L)

(superior or anterior at the top of every picture; left and right are a mirror the training data holds both of).
``restore`` takes a mask back to the file's own voxel grid, exactly: the result's NIfTI lines up with the input
voxel for voxel. Pure functions on arrays; volumes are [Z, Y, X] (slice, row, column), NIfTI's (i, j, k) reversed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

Plane = Literal["axial", "coronal", "sagittal"]
# Where the (column, row, slice) axes point, in nibabel's axis codes (the direction each axis increases to).
PLANES: dict[str, tuple[str, str, str]] = {
    "axial": ("L", "P", "S"),
    "coronal": ("L", "I", "A"),
    "sagittal": ("A", "I", "L"),
}


def _ijk(volume: np.ndarray) -> np.ndarray:
    """[Z, Y, X(, C)] -> [i, j, k(, C)] view."""
    return volume.transpose(2, 1, 0, *range(3, volume.ndim))


def _transform(source: Sequence[str], target: Sequence[str]) -> np.ndarray:
    return ornt_transform(axcodes2ornt(tuple(source)), axcodes2ornt(tuple(target)))


def axis_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """The direction each voxel axis (i, j, k) points to, nearest world axis; RAS world (NIfTI)."""
    i, j, k = aff2axcodes(np.asarray(affine, dtype=np.float64))
    return str(i), str(j), str(k)


def canonical(
    volume: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float] | None, plane: Plane = "axial"
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float] | None]:
    """(volume, affine, spacing) sliced along ``plane`` in the display convention (module docstring).

    The affine is the exact voxel-to-world matrix of the new voxel order, so world coordinates never change."""
    source = axis_codes(affine)
    target = PLANES[plane]
    ornt = _transform(source, target)
    ijk = _ijk(volume)
    moved = np.ascontiguousarray(_ijk(apply_orientation(ijk, ornt)))
    new_affine = np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(ornt, ijk.shape[:3])
    new_spacing = None
    if spacing is not None:
        sizes = [0.0, 0.0, 0.0]
        for axis, (new_axis, _) in zip((0, 1, 2), ornt, strict=True):
            sizes[int(new_axis)] = (spacing[2], spacing[1], spacing[0])[axis]
        new_spacing = (sizes[2], sizes[1], sizes[0])
    return moved, new_affine, new_spacing


def restore(mask: np.ndarray, affine: np.ndarray, stored: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A [Z, Y, X] mask on the canonical grid of ``affine`` back to the file's voxel order ``stored`` (its axis
    codes), with the file's affine: the inverse of ``canonical``, without resampling."""
    ornt = _transform(axis_codes(affine), stored)
    ijk = _ijk(mask)
    back = np.ascontiguousarray(_ijk(apply_orientation(ijk, ornt)))
    return back, np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(ornt, ijk.shape[:3])
