"""nnU-Net v2 raw-layout writer for 2D PNG datasets (the natural-image convention).

Layout, per dataset::

    DatasetXXX_Name/
      dataset.json
      imagesTr/<case>_0000.png   grey: 8-bit 'L'; RGB tasks: one 8-bit RGB PNG
      labelsTr/<case>.png        8-bit, values 0/1
      imagesTs/<case>_0000.png
      labelsTs/<case>.png
      rawTs/<case>.nii.gz        CT / MR test cases only: the scan in HU (int16) or MR units (float32), one slice,
                                 stored as the project's reader and nnU-Net index NIfTI (rows along voxel axis 1)

PNGs are written by Pillow without metadata chunks, so equal arrays give byte-identical files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.files import RAW_FOLDER, write_scan

__all__ = [
    "SUBFOLDERS",
    "dataset_json",
    "image_path",
    "label_path",
    "prepare_dataset_folder",
    "write_case",
    "write_json",
    "write_raw",
]

SUBFOLDERS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}


def image_path(folder: Path, split: str, case: str) -> Path:
    return folder / SUBFOLDERS[split][0] / f"{case}_0000.png"


def label_path(folder: Path, split: str, case: str) -> Path:
    return folder / SUBFOLDERS[split][1] / f"{case}.png"


def prepare_dataset_folder(folder: Path) -> None:
    """Create the dataset folder with fresh, empty ``imagesTr``/``labelsTr``/``imagesTs``/``labelsTs``.

    All four always exist, as nnU-Net and the project's reader expect: a zero-shot dataset has empty
    training folders (``numTraining`` 0). Existing ones are removed first, so a rewrite with fewer cases
    leaves no stale cases behind; nothing else in ``folder`` is touched.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for pair in SUBFOLDERS.values():
        for sub in pair:
            if (folder / sub).is_dir():
                shutil.rmtree(folder / sub)
            (folder / sub).mkdir()
    if (folder / RAW_FOLDER).is_dir():
        shutil.rmtree(folder / RAW_FOLDER)


def _save_png(array: np.ndarray, path: Path) -> None:
    # uint8 H x W becomes an 'L' image and uint8 H x W x 3 an 'RGB' one
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG", compress_level=6)


def write_case(folder: Path, split: str, case: str, image: np.ndarray, mask: np.ndarray) -> None:
    """Write one case: ``image`` uint8 HxW or HxWx3, ``mask`` uint8 HxW with values in {0, 1}."""
    if image.dtype != np.uint8 or mask.dtype != np.uint8:
        raise TypeError("image and mask must be uint8")
    if image.shape[:2] != mask.shape or mask.ndim != 2:
        raise ValueError(f"image {image.shape} and mask {mask.shape} do not match")
    if mask.max(initial=0) > 1:
        raise ValueError("mask values must be 0 or 1")
    _save_png(image, image_path(folder, split, case))
    _save_png(mask, label_path(folder, split, case))


def write_raw(folder: Path, case: str, raw: np.ndarray, units: str | None) -> Path:
    """One test case's scan before the recipe, so evaluation can send it as a file a hospital would."""
    return write_scan(folder / RAW_FOLDER / f"{case}.nii.gz", raw, units)


def dataset_json(
    *, name: str, description: str, channel_names: dict[str, str], target: str, num_training: int, c2p: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "channel_names": channel_names,
        "labels": {"background": 0, target: 1},
        "numTraining": num_training,
        "file_ending": ".png",
        "c2p": c2p,
    }


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
