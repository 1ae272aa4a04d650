"""Reading the image files of a case: NIfTI planes and pictures, scaled to [0, 1] by the recipe; masks checked.

Whatever the layout, a case's files are read the same way, so the file readers (nibabel, Pillow) live here only.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from models import recipe as recipes
from models.data.layout.common import (
    _SLICE_TAG,
    NIFTI_ENDINGS,
    PICTURE_ENDINGS,
    Case,
    DatasetError,
    DatasetInfo,
    _ending,
    _reading,
    _Source,
)


def _any_rgb(sources: list[_Source]) -> bool:
    """Whether the dataset is colour, from the first picture's header (decoding pixels is not needed)."""
    first = next((s.images for s in sources if _ending(s.images[0]) in PICTURE_ENDINGS), None)
    if first is None:
        return False
    if len(first) == 3:
        return True
    with _reading(first[0]), Image.open(first[0]) as picture:
        return picture.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr")


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    """Trailing length-1 axes beyond two carry nothing: (X, Y, 1) is a 2D image."""
    dims = list(shape)
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    if len(dims) not in (2, 3):
        raise DatasetError(path, f"NIfTI of shape {tuple(shape)} is neither 2D nor 3D")
    return tuple(dims)


def _nifti_shape(path: Path) -> tuple[int, ...]:
    """The spatial shape from the header alone (nibabel loads voxels only when they are sliced)."""
    with _reading(path):
        shape = nib.load(path).shape
    return _spatial_shape(shape, path)


def _cases_of(source: _Source, dataset: str, axis: int) -> list[Case]:
    """A picture or 2D NIfTI is one case; a 3D NIfTI is one case per slice along ``axis``."""
    if _ending(source.images[0]) not in NIFTI_ENDINGS:
        return [Case(dataset, source.case, source.images, source.label, source.split)]
    shape = _nifti_shape(source.images[0])
    for path in (*source.images[1:], *([source.label] if source.label else [])):
        other = _nifti_shape(path)
        if other != shape:
            raise DatasetError(path, f"shape {other} differs from {source.images[0].name}'s {shape}")
    if len(shape) == 2:
        return [Case(dataset, source.case, source.images, source.label, source.split)]
    return [
        Case(dataset, f"{source.case}{_SLICE_TAG}{index}", source.images, source.label, source.split, index)
        for index in range(shape[axis])
    ]


def _nifti_plane(path: Path, slice_index: int | None, axis: int) -> np.ndarray:
    """One plane through the proxy, so only its voxels are read; transposed to SimpleITK's row order."""
    with _reading(path):
        image = nib.load(path)
        spatial = _spatial_shape(image.shape, path)
        index: list[int | slice] = [slice(None)] * len(spatial) + [0] * (len(image.shape) - len(spatial))
        if len(spatial) == 3:
            if slice_index is None:
                raise DatasetError(path, "is a 3D volume but the case has no slice index")
            index[axis % 3] = slice_index
        elif slice_index is not None:
            raise DatasetError(path, f"is 2D but the case asks for slice {slice_index}")
        plane = np.asarray(image.dataobj[tuple(index)])
    return plane.T


def scale_percentiles(plane: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Maps the [low, high] percentiles to [0, 1]: robust to the few extreme voxels MR and US carry."""
    values = np.nan_to_num(plane.astype(np.float32))
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return recipes.to_unit(values, recipes.Plan("percentile", percentiles=(float(lo), float(hi))))


def apply_window(plane: np.ndarray, center: float, width: float) -> np.ndarray:
    """A CT display window: HU have a fixed meaning, so a fixed window beats per-slice statistics."""
    return recipes.to_unit(np.nan_to_num(plane.astype(np.float32)), recipes.Plan("window", window=(center, width)))


def _scaled(plane: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """The recipe (models/recipe.py) on one deep plane: a dataset's own window, else the recipe's CT window for CT,
    else the recipe's percentiles of the plane (a training case is one slice, as a one-slice upload is)."""
    if info.window:
        return apply_window(plane, *info.window)
    recipe = recipes.Recipe()
    if info.modality == "ct":
        return apply_window(plane, *recipe.ct_window)
    return scale_percentiles(plane, *recipe.percentiles)


def _picture_pixels(path: Path, mask: bool) -> np.ndarray:
    """Decoded pixels: HxW for grey, HxWx3 for colour; a palette mask keeps its indices (nnU-Net's labels)."""
    with _reading(path), Image.open(path) as picture:
        picture.load()
        if picture.mode in ("RGBA", "CMYK", "YCbCr") or (picture.mode == "P" and not mask):
            picture = picture.convert("RGB")
        elif picture.mode in ("LA", "1"):
            picture = picture.convert("L")
        return np.asarray(picture)


def _image_plane(path: Path, case: Case, info: DatasetInfo) -> np.ndarray:
    """Float [0, 1] pixels of one image file: HxW (grey) or HxWx3 (colour)."""
    if _ending(path) in NIFTI_ENDINGS:
        return _scaled(_nifti_plane(path, case.slice_index, info.slice_axis), info)
    pixels = _picture_pixels(path, mask=False)
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    if pixels.ndim == 3:
        raise DatasetError(path, f"colour pictures must be 8-bit, got {pixels.dtype}")
    return _scaled(pixels.astype(np.float32), info)


def load_image(case: Case, info: DatasetInfo) -> np.ndarray:
    """The case's image as float32 HxWx3 in [0, 1]; grey is replicated because C2P reads RGB."""
    planes = [_image_plane(path, case, info) for path in case.image_paths]
    if len(planes) == 1:
        plane = planes[0]
        return np.ascontiguousarray(plane if plane.ndim == 3 else np.repeat(plane[..., None], 3, axis=2))
    for path, plane in zip(case.image_paths, planes, strict=True):
        if plane.ndim != 2 or plane.shape != planes[0].shape:
            first = case.image_paths[0].name
            raise DatasetError(path, f"channel of shape {plane.shape} does not match {first}'s {planes[0].shape}")
    return np.stack(planes, axis=2)


def _binary_mask(values: np.ndarray, path: Path) -> np.ndarray:
    """{0, 1} or {0, 255}; anything else (several classes, JPEG artefacts) is refused, never guessed."""
    present = np.unique(values)
    for allowed in ((0, 1), (0, 255)):
        if np.isin(present, allowed).all():
            return (values == allowed[1]).astype(np.uint8)
    unexpected = [v.item() for v in present if v not in (0, 1, 255)] or [v.item() for v in present]
    raise DatasetError(
        path,
        f"mask must hold only {{0, 1}} or {{0, 255}}; unexpected values {unexpected[:10]}"
        f"{' ...' if len(unexpected) > 10 else ''} (present: {len(present)} distinct values)",
    )


def _mask_plane(path: Path, case: Case, info: DatasetInfo) -> np.ndarray:
    if _ending(path) in NIFTI_ENDINGS:
        return _binary_mask(_nifti_plane(path, case.slice_index, info.slice_axis), path)
    pixels = _picture_pixels(path, mask=True)
    if pixels.ndim == 3:
        if not (pixels == pixels[..., :1]).all():
            raise DatasetError(path, "colour mask whose channels differ; masks must be grey {0, 1} or {0, 255}")
        pixels = pixels[..., 0]
    return _binary_mask(pixels, path)


def load_case(case: Case, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32 HxWx3 in [0, 1]) and mask (uint8 HxW in {0, 1}) of one case, checked against each other."""
    if case.label_path is None:
        kind = "training" if case.split == "train" else "test"
        raise DatasetError(case.image_paths[0], f"label missing for {kind} case '{case.case_id}'")
    image = load_image(case, info)
    mask = _mask_plane(case.label_path, case, info)
    if mask.shape != image.shape[:2]:
        raise DatasetError(
            case.label_path, f"label is {mask.shape} but image {case.image_paths[0].name} is {image.shape[:2]}"
        )
    return image, mask
