"""The foreign generator: evaluation data drawn by code the model was never built from (``c2p data foreign``).

A benchmark made by the training generator measures how well the model learned that generator. This one shares
none of its code, shapes, textures or parameters (no training config may import it: tests/models/test_foreign.py
checks), so its figures say how far the model learned the task:

- **brain tumours on MR**: the MNI152 T1 (nilearn's packaged copy) in the three planes, from the slabs the training
  data holds out; tumours are superformula contours or unions of metaballs, with a T2-bright oedema halo drawn as a
  fraction of the tumour, a Voronoi-cell texture, and contrast from a random monotone curve of the whole slice;
- **lesions on a real CT**: pydicom's CT_small (never a training background), random rotations by a multiple of
  90 degrees, lesions as superformula contours in HU drawn from clinical ranges (cysts, solid, enhancing);
- **healthy MR**: the same held-out slices with nothing added (the model must answer "nothing here");
- **blank**: zeros, constants and flat noise at several sizes.

Written in nnU-Net v2 layout (PNG images through the project's recipe, raw NIfTI beside the test cases), one
dataset per family, with ``c2p.split`` naming the family so ``c2p evaluate`` reports each one apart.
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from models import recipe as recipes
from models.files import RAW_FOLDER, write_scan

FAMILIES = {
    "foreign_brain_tumour": {"id": 301, "split": "foreign", "modality": "mri", "concept": "brain lesion on MR"},
    "foreign_ct_lesion": {"id": 302, "split": "foreign", "modality": "ct", "concept": "lesion on CT"},
    "healthy_brain": {"id": 311, "split": "negative-healthy", "modality": "mri", "concept": "brain lesion on MR"},
    "blank": {"id": 312, "split": "negative-blank", "modality": "unknown", "concept": ""},
}
# The training data's held-out MNI slabs (models/data/synth/mri.py: MNI_HELD_OUT), repeated here as numbers so
# this module imports nothing of the training generator; tests check the two agree.
HELD_OUT = {"axial": ((34, 56), (118, 140)), "coronal": ((95, 115),), "sagittal": ((60, 69), (127, 136))}


@lru_cache(maxsize=1)
def _mni() -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

        t1 = np.asarray(load_mni152_template(resolution=1).get_fdata(), np.float32)
        brain = np.asarray(load_mni152_brain_mask(resolution=1).get_fdata(), np.float32) > 0.5
    return t1, brain


def _mni_plane(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    t1, brain = _mni()
    plane = ("axial", "coronal", "sagittal")[int(rng.integers(3))]
    ranges = HELD_OUT[plane]
    lo, hi = ranges[int(rng.integers(len(ranges)))]
    index = int(rng.integers(lo, hi))
    take = {"axial": lambda v: v[:, :, index], "coronal": lambda v: v[:, index, :], "sagittal": lambda v: v[index]}
    cuts = [np.rot90(take[plane](v).astype(np.float32)) for v in (t1, brain)]
    side = max(cuts[0].shape)
    out = []
    for cut in cuts:
        padded = np.zeros((side, side), np.float32)
        r, c = (side - cut.shape[0]) // 2, (side - cut.shape[1]) // 2
        padded[r : r + cut.shape[0], c : c + cut.shape[1]] = cut
        out.append(np.asarray(Image.fromarray(padded, "F").resize((size, size), Image.Resampling.BICUBIC)))
    return out[0], out[1] > 0.5, {"plane": plane, "slice_index": index}


def _superformula(rng: np.random.Generator, shape: tuple[int, int], centre, radius: float) -> np.ndarray:
    """Gielis' superformula r(phi) = (|cos(m phi/4)/a|^n2 + |sin(m phi/4)/b|^n3)^(-1/n1): stars, flowers, lobes."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    phi = np.arctan2(yy - centre[0], xx - centre[1]) + rng.uniform(0, 2 * np.pi)
    m, n1 = rng.integers(2, 9), rng.uniform(2, 12)
    n2, n3 = rng.uniform(1.5, 10), rng.uniform(1.5, 10)
    r = (np.abs(np.cos(m * phi / 4)) ** n2 + np.abs(np.sin(m * phi / 4)) ** n3) ** (-1 / n1)
    r = r / np.percentile(r, 95) * radius
    return np.hypot(yy - centre[0], xx - centre[1]) < r


def _metaballs(rng: np.random.Generator, shape: tuple[int, int], centre, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    field = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = centre[0] + rng.normal(0, radius * 0.5), centre[1] + rng.normal(0, radius * 0.5)
        field += (radius * rng.uniform(0.3, 0.7)) ** 2 / ((yy - cy) ** 2 + (xx - cx) ** 2 + 1)
    return field > 1.0


def _voronoi_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    points = rng.random((int(rng.integers(20, 80)), 2)) * np.array(shape)
    seeds = np.zeros(shape, np.int32)
    for k, (r, c) in enumerate(points.astype(int), start=1):
        seeds[min(r, shape[0] - 1), min(c, shape[1] - 1)] = k
    _, (ri, ci) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    values = rng.normal(0, 1, len(points) + 1).astype(np.float32)
    return values[seeds[ri, ci]]


def _lesion(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    shape = tissue.shape
    area = float(np.exp(rng.uniform(np.log(0.003), np.log(0.15)))) * tissue.sum()
    radius = float(np.sqrt(area / np.pi))
    inner = ndimage.binary_erosion(tissue, iterations=max(1, int(radius * 0.7)))
    rows, cols = np.nonzero(inner if inner.any() else tissue)
    j = int(rng.integers(len(rows)))
    draw = _superformula if rng.random() < 0.5 else _metaballs
    return draw(rng, shape, (rows[j], cols[j]), radius) & tissue


def foreign_brain(rng: np.random.Generator, size: int, healthy: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    t1, brain, meta = _mni_plane(rng, size)
    mask = np.zeros(t1.shape, bool)
    image = t1.copy()
    if not healthy and brain.sum() > 200:
        mask = _lesion(rng, brain)
        level = float(np.percentile(t1[brain], 50))
        halo = ndimage.binary_dilation(mask, iterations=int(rng.integers(2, 7))) & brain & ~mask
        image = np.where(halo, image * rng.uniform(0.75, 0.95), image)
        contrast = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.6) * level
        texture = _voronoi_texture(rng, t1.shape) * 0.12 * abs(contrast)
        image = np.where(mask, image + contrast + texture, image)
        meta["shape"] = "superformula-or-metaballs"
    # a random monotone tone curve of the whole slice, then a smooth sinusoidal shading
    knots = np.sort(rng.random(4))
    scaled = image / max(float(image.max()), 1e-6)
    image = np.interp(scaled, np.r_[0, knots, 1], np.r_[0, np.sort(rng.random(4)), 1]) * 1000
    yy, xx = np.mgrid[:size, :size] / size
    image = image * (1 + 0.15 * np.sin(2 * np.pi * (rng.random() * yy + rng.random() * xx) + rng.random() * 6))
    return np.clip(image, 0, None).astype(np.float32), mask, meta


@lru_cache(maxsize=1)
def _ct_small() -> np.ndarray:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def foreign_ct(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    hu = np.rot90(_ct_small(), int(rng.integers(4)))
    hu = np.asarray(Image.fromarray(np.ascontiguousarray(hu), "F").resize((size, size), Image.Resampling.BICUBIC))
    tissue = ndimage.binary_erosion((hu > -150) & (hu < 200), iterations=2)
    mask = _lesion(rng, tissue) if tissue.sum() > 200 else np.zeros(hu.shape, bool)
    kind = ("cyst", "solid", "enhancing")[int(rng.integers(3))]
    value = {"cyst": rng.uniform(-10, 15), "solid": rng.uniform(-80, -40), "enhancing": rng.uniform(150, 250)}[kind]
    edge = ndimage.gaussian_filter(mask.astype(np.float32), rng.uniform(0.5, 1.5))
    hu = hu * (1 - edge) + edge * (value + rng.normal(0, 8, hu.shape))
    return hu.astype(np.float32), edge >= 0.5, {"kind": kind}


def blank(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    kind = ("zeros", "constant", "flat-noise")[int(rng.integers(3))]
    side = int(rng.choice([64, size, 2 * size]))
    value = {"zeros": 0.0, "constant": rng.uniform(0, 255), "flat-noise": rng.uniform(50, 200)}[kind]
    image = np.full((side, side), value, np.float32)
    if kind == "flat-noise":
        image += rng.normal(0, 0.3, image.shape)  # below one grey level
    return np.clip(image, 0, 255), np.zeros((side, side), bool), {"kind": kind}


def _render(family: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, dict, str | None]:
    if family == "foreign_brain_tumour":
        return (*foreign_brain(rng, size, healthy=False), "MR")
    if family == "healthy_brain":
        return (*foreign_brain(rng, size, healthy=True), "MR")
    if family == "foreign_ct_lesion":
        return (*foreign_ct(rng, size), "CT")
    return (*blank(rng, size), None)


def write_foreign(out: str | Path, seed: int = 1000, n: int = 60, size: int = 256) -> list[Path]:
    """One nnU-Net folder per family under ``out``, ``n`` test cases each; returns their paths."""
    out = Path(out)
    folders = []
    for family, spec in FAMILIES.items():
        folder = out / f"Dataset{spec['id']:03d}_{''.join(w.title() for w in family.split('_'))}"
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", RAW_FOLDER):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        cases = []
        for index in range(n):
            rng = np.random.default_rng([seed, spec["id"], index])
            raw, mask, meta, units = _render(family, rng, size)
            case = f"{family}_{index:04d}"
            if units is None:
                image = np.rint(raw).astype(np.uint8)  # a picture: display values as they are
            else:
                unit = recipes.to_unit(raw, recipes.decide(raw, recipes.Recipe(), modality=units))
                image = np.rint(unit * 255).astype(np.uint8)
                write_scan(folder / RAW_FOLDER / f"{case}.nii.gz", raw, units)
            Image.fromarray(image).save(folder / "imagesTs" / f"{case}_0000.png")
            Image.fromarray(mask.astype(np.uint8)).save(folder / "labelsTs" / f"{case}.png")
            cases.append({"case": case, "empty": not mask.any(), "units": units, **meta})
        c2p = {
            "task": family,
            "modality": spec["modality"],
            "target": "lesion",
            "organ": "",
            "concept": spec["concept"],
            "split": spec["split"],
            "rgb": False,
            "description": f"foreign generator: {family}",
            "source": {"generator": "c2p data foreign", "seed": seed, "size": size},
        }
        dataset = {
            "name": folder.name[11:],
            "description": c2p["description"],
            "channel_names": {"0": "MRI"},
            "labels": {"background": 0, "lesion": 1},
            "numTraining": 0,
            "file_ending": ".png",
            "c2p": c2p,
        }
        (folder / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
        (folder / "c2p_cases.json").write_text(json.dumps(cases, indent=1) + "\n")
        folders.append(folder)
    return folders
