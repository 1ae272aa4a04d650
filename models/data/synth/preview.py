"""Contact sheet of the synthetic benchmark: a few cases per task with the target outlined in green."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from . import TASKS, generate_case

__all__ = ["contact_sheet"]


def _outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image.copy()
    m = mask.astype(bool)
    edge = m & ~ndimage.binary_erosion(m)
    edge = ndimage.binary_dilation(edge) & ~ndimage.binary_erosion(m, iterations=2) if m.any() else edge
    rgb[edge] = (0, 255, 0)
    return rgb


def contact_sheet(
    path: Path,
    tasks: Sequence[str] | None = None,
    per_task: int = 4,
    seed: int = 0,
    size: int = 256,
    split: str = "test",
) -> Path:
    """Write a PNG grid: one row per task, ``per_task`` cases each, shown raw and with the mask outline."""
    names = list(TASKS) if tasks is None else list(tasks)
    label_h = 14
    rows = []
    for name in names:
        tiles = []
        for i in range(per_task):
            image, mask, _ = generate_case(name, seed, split, i, size)
            raw = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
            tiles += [raw, _outline(image, mask)]
        strip = np.concatenate(tiles, axis=1)
        banner = Image.new("RGB", (strip.shape[1], label_h), (0, 0, 0))
        ImageDraw.Draw(banner).text((4, 1), f"{name} ({TASKS[name].modality})", fill=(255, 255, 255))
        rows.append(np.concatenate([np.asarray(banner), strip], axis=0))
    sheet = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path, format="PNG")
    return path
