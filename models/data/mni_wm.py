"""``c2p data mni-wm``: white matter on the MNI152 T1 template, a real-image task that ships with nilearn.

The synthetic benchmark tells us whether training works at all; this dataset tells us whether it works
on real MR anatomy, with nothing to download (the 1 mm ICBM152 2009a T1 and white-matter templates
are package data of nilearn). It is one brain, so what keeps the test honest is the split: held-out
axial slabs with a gap of ``GAP`` slices on each side where nothing is used for training (neighbouring
1 mm slices are nearly copies of each other), and coronal and sagittal test slices, a plane the model
never saw (they cross the training slabs' voxels, so that group measures plane transfer, not unseen
anatomy). The output is an nnU-Net v2 raw folder that ``models.data.layout.open_dataset`` reads.

Masks are the WM probability thresholded at 0.5 after resampling the probability, not the binary mask,
so the boundary is placed where the template puts it. A light seeded augmentation (rotation, scale,
shift, gamma, a smooth bias field) gives each training slice a variant, so a model sees more than the
~75 distinct training slices one template offers; test slices are never augmented.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "DATASET_FOLDER",
    "TASK",
    "Template",
    "axial_split",
    "load_template",
    "usable_range",
    "write_mni_white_matter",
]

DATASET_FOLDER = "Dataset950_MNIWhiteMatter"
TASK = "mni_white_matter"
WM_THRESHOLD = 0.5
BRAIN_THRESHOLD = 0.2  # nilearn's own brain-mask threshold on the 0-1 T1 template
MIN_BRAIN_FRACTION = 0.10  # of the slice: below it a slice is mostly air (skull top, skull base)
MIN_WM_FRACTION = 0.01
TEST_SLAB = 5  # axial slices per held-out slab
BOX_MARGIN = 6  # voxels of air kept around the brain
GAP = 5  # slices left out on each side of a test slab
TEST_SLAB_FRACTIONS = (0.2, 0.5, 0.8)  # slab centres, as fractions of the usable axial range
# Other planes (voxel axis, positions as fractions of the usable range); sagittal avoids the midline,
# where white matter is only the thin corpus callosum.
OTHER_PLANES = {"coronal": (1, (0.3, 0.5, 0.7)), "sagittal": (0, (0.3, 0.7))}
PLANE_TAGS = {"axial": "ax_z", "coronal": "cor_y", "sagittal": "sag_x"}
SOURCE = (
    "MNI152 ICBM 2009a nonlinear symmetric T1 and white-matter templates, 1 mm, as packaged by nilearn "
    "(Fonov et al., NeuroImage 2011; McConnell Brain Imaging Centre, free use with the copyright notice)"
)


@dataclass(frozen=True)
class Template:
    """The 1 mm template as arrays: T1 and WM probability in [0, 1], brain mask; voxel axes (x, y, z)."""

    t1: np.ndarray
    wm: np.ndarray
    brain: np.ndarray


@dataclass(frozen=True)
class _Item:
    case: str
    split: str  # "train" or "test"
    image: np.ndarray  # uint8 size x size
    mask: np.ndarray  # uint8 size x size in {0, 1}


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Reads nilearn's packaged templates (no network); imported here because nilearn takes seconds to import."""
    from nilearn.datasets import load_mni152_template, load_mni152_wm_template

    t1 = np.array(load_mni152_template(resolution=1).dataobj, dtype=np.float32)
    wm = np.array(load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    template = Template(t1=t1, wm=wm, brain=t1 > BRAIN_THRESHOLD)
    for array in (template.t1, template.wm, template.brain):
        array.flags.writeable = False  # cached and shared: nobody may change it
    return template


def usable_range(template: Template, axis: int) -> tuple[int, int]:
    """First and last slice along ``axis`` with enough brain and white matter to be worth segmenting."""
    others = tuple(a for a in range(3) if a != axis)
    brain = template.brain.mean(axis=others)
    wm = (template.wm > WM_THRESHOLD).mean(axis=others)
    usable = np.flatnonzero((brain >= MIN_BRAIN_FRACTION) & (wm >= MIN_WM_FRACTION))
    return int(usable[0]), int(usable[-1])


def axial_split(first: int, last: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Training and test slabs (inclusive index ranges) of ``first..last``, ``GAP`` slices apart."""
    test, excluded = [], set()
    for fraction in TEST_SLAB_FRACTIONS:
        start = first + round(fraction * (last - first)) - TEST_SLAB // 2
        test.append((start, start + TEST_SLAB - 1))
        excluded.update(range(start - GAP, start + TEST_SLAB + GAP))
    train_slices = [z for z in range(first, last + 1) if z not in excluded]
    return _ranges(train_slices), test


def _ranges(indices: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for index in indices:
        if ranges and ranges[-1][1] == index - 1:
            ranges[-1] = (ranges[-1][0], index)
        else:
            ranges.append((index, index))
    return ranges


def _positions(first: int, last: int, fractions: tuple[float, ...]) -> list[int]:
    return [first + round(f * (last - first)) for f in fractions]


def _brain_box(template: Template) -> tuple[slice, ...]:
    """The brain's bounding box plus a margin: the template's field of view is mostly air."""
    nonzero = np.nonzero(template.brain)
    return tuple(
        slice(max(int(n.min()) - BOX_MARGIN, 0), min(int(n.max()) + BOX_MARGIN + 1, size))
        for n, size in zip(nonzero, template.brain.shape, strict=True)
    )


def _display_plane(volume: np.ndarray, box: tuple[slice, ...], axis: int, index: int) -> np.ndarray:
    """A slice as radiology shows it (anterior or superior at the top), so the PNGs look familiar."""
    where: list[slice | int] = list(box)
    where[axis] = index
    return np.rot90(volume[tuple(where)])  # basic indexing, a view: np.take would copy the volume


@dataclass(frozen=True)
class _Warp:
    """A similarity transform (about the centre) and an intensity change; the identity for test slices."""

    angle: float = 0.0  # radians
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # fraction of the output size
    gamma: float = 1.0
    bias: tuple[float, float] = (0.0, 0.0)  # log-gain slope along rows and columns


def _random_warp(rng: np.random.Generator) -> _Warp:
    return _Warp(
        angle=math.radians(rng.uniform(-10, 10)),
        scale=rng.uniform(0.9, 1.1),
        shift=(rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)),
        gamma=math.exp(rng.uniform(-0.25, 0.25)),
        bias=(rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2)),
    )


def _resample(plane: np.ndarray, size: int, warp: _Warp) -> np.ndarray:
    """Fits the plane into a zero-padded square (aspect kept) and applies the warp, in one interpolation."""
    zoom = size / max(plane.shape) * warp.scale
    if zoom < 1:  # shrinking: smooth first so thin white-matter strands do not alias
        plane = ndimage.gaussian_filter(plane, sigma=(1 / zoom - 1) / 2)
    cos, sin = math.cos(warp.angle), math.sin(warp.angle)
    matrix = np.array([[cos, sin], [-sin, cos]]) / zoom  # output pixel -> input pixel
    centre_out = np.full(2, (size - 1) / 2) + np.asarray(warp.shift) * size
    centre_in = (np.asarray(plane.shape) - 1) / 2
    offset = centre_in - matrix @ centre_out
    return ndimage.affine_transform(plane, matrix, offset, output_shape=(size, size), order=1, cval=0.0)


def _intensity(plane: np.ndarray, warp: _Warp) -> np.ndarray:
    """Gamma and a smooth multiplicative bias field, the two ways MR contrast varies between scans."""
    rows, cols = np.meshgrid(*(np.linspace(-1, 1, n) for n in plane.shape), indexing="ij")
    field = np.exp(warp.bias[0] * rows + warp.bias[1] * cols)
    return np.clip(plane, 0, None) ** warp.gamma * field


def _to_uint8(plane: np.ndarray) -> np.ndarray:
    """8 bits by the 0.5/99.5 percentiles, the scaling layout.py applies to volumes."""
    lo, hi = np.percentile(plane, [0.5, 99.5])
    scaled = np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.round(scaled * 255).astype(np.uint8)


def _item(
    template: Template, box: tuple[slice, ...], case: str, split: str, axis: int, index: int, size: int, warp: _Warp
) -> _Item:
    t1 = _resample(_display_plane(template.t1, box, axis, index), size, warp)
    wm = _resample(_display_plane(template.wm, box, axis, index), size, warp)
    image = _to_uint8(_intensity(t1, warp))
    return _Item(case, split, image, (wm > WM_THRESHOLD).astype(np.uint8))


def _items(
    template: Template, size: int, seed: int, augmented_copies: int
) -> tuple[list[_Item], dict[str, list[str]], dict[str, Any]]:
    """Every slice of the dataset, the test groups by plane, and the slice ranges used (for dataset.json)."""
    rng = np.random.default_rng(seed)
    box = _brain_box(template)
    first, last = usable_range(template, axis=2)
    train, test = axial_split(first, last)
    items, groups = [], {plane: [] for plane in PLANE_TAGS}
    for start, stop in train:
        for z in range(start, stop + 1):
            case = f"mni_{PLANE_TAGS['axial']}{z:03d}"
            items.append(_item(template, box, case, "train", 2, z, size, _Warp()))
            for copy in range(1, augmented_copies + 1):
                items.append(_item(template, box, f"{case}_aug{copy}", "train", 2, z, size, _random_warp(rng)))
    tests = {"axial": (2, [z for start, stop in test for z in range(start, stop + 1)])}
    for plane, (axis, fractions) in OTHER_PLANES.items():
        tests[plane] = (axis, _positions(*usable_range(template, axis), fractions))
    for plane, (axis, indices) in tests.items():
        for index in indices:
            case = f"mni_{PLANE_TAGS[plane]}{index:03d}"
            items.append(_item(template, box, case, "test", axis, index, size, _Warp()))
            groups[plane].append(case)
    ranges = {
        "indices": "voxel indices (x, y, z) of the 1 mm template, inclusive ranges",
        "axial_usable": [first, last],
        "axial_train": [list(r) for r in train],
        "axial_test": [list(r) for r in test],
        "gap": GAP,
        "coronal_test": tests["coronal"][1],
        "sagittal_test": tests["sagittal"][1],
        "augmented_copies": augmented_copies,
        "seed": seed,
        "size": size,
    }
    return items, groups, ranges


def _dataset_json(items: list[_Item], groups: dict[str, list[str]], ranges: dict[str, Any]) -> dict[str, Any]:
    description = "Binary white matter on slices of the MNI152 2009a T1 template (one brain, held-out slabs)"
    return {
        "name": "MNIWhiteMatter",
        "description": description,
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "white matter": 1},
        "numTraining": sum(item.split == "train" for item in items),
        "file_ending": ".png",
        "c2p": {
            "task": TASK,
            "modality": "mri",
            "target": "white matter",
            "organ": "brain",
            "description": description,
            "split": "train",
            "rgb": False,
            "groups": groups,
            "slice_ranges": ranges,
            "source": SOURCE,
        },
    }


def _write_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, optimize=False)


def _write(folder: Path, items: list[_Item], spec: dict[str, Any]) -> None:
    for name in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / name).mkdir(parents=True)
    for item in items:
        suffix = "Tr" if item.split == "train" else "Ts"
        _write_png(folder / f"images{suffix}" / f"{item.case}_0000.png", item.image)
        _write_png(folder / f"labels{suffix}" / f"{item.case}.png", item.mask)
    (folder / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


def _is_ours(folder: Path) -> bool:
    """Only a folder this command wrote may be replaced: never delete what a user put there."""
    try:
        spec = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(spec, dict) and isinstance(spec.get("c2p"), dict) and spec["c2p"].get("task") == TASK


def write_mni_white_matter(out: Path, size: int = 256, seed: int = 0, *, augmented_copies: int = 1) -> Path:
    """Writes ``out/Dataset950_MNIWhiteMatter`` (replacing an earlier one) and returns that folder.

    The folder is built beside its final place and renamed in, so a crash never leaves half a dataset
    that ``open_dataset`` would accept.
    """
    if size < 16 or augmented_copies < 0:
        raise ValueError(f"size must be >= 16 and augmented_copies >= 0, got {size} and {augmented_copies}")
    out = Path(out)
    target = out / DATASET_FOLDER
    if target.exists() and not _is_ours(target):
        raise FileExistsError(f"{target}: exists and was not written by 'c2p data mni-wm'; not replacing it")
    items, groups, ranges = _items(load_template(), size, seed, augmented_copies)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mni-wm-", dir=out))
    try:
        _write(staging / DATASET_FOLDER, items, _dataset_json(items, groups, ranges))
        if target.exists():
            shutil.rmtree(target)
        (staging / DATASET_FOLDER).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
