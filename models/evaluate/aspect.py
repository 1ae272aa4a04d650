"""``c2p evaluate --aspect``: does keeping a slice's aspect ratio pay, for this model, on images it was not built from?

Every generated test image is square, so the card's figures cannot tell letterbox from stretch (on a square the two
are the same). Here each test case is cropped to a non-square window around its target (twice as wide as tall, and
twice as tall as wide), segmented by the serving graph in PyTorch once stretched into the network's square and once
letterboxed, each probability taken back to the crop's own grid the way the service does (models/recipe.py:
``to_grid``) and scored there, with the content gate on the content box. Side by side in one run, on the same
crops; no abstention (it is the same bound for both and would only hide findings from the comparison).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import recipe as recipes
from models.checkpoint import resolve
from models.consensus import consensus, make_views
from models.data.layout import find_datasets, load_case, open_dataset
from models.evaluate import SPLIT_NAMES
from models.evaluate.metrics import dice_iou
from models.registry import build_c2p

log = logging.getLogger(__name__)

# columns / rows of the crops: one wide, one tall.
ASPECTS = (2.0, 0.5)
RESIZES = {"stretch": False, "letterbox": True}


def crop(image: np.ndarray, mask: np.ndarray, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """The image's full extent along its longer side kept, the other shortened to ``aspect``, centred on the target
    (the image's centre when there is none) and clamped inside the image."""
    height, width = mask.shape
    rows, columns = (round(width / aspect), width) if aspect >= 1 else (height, round(height * aspect))
    rows, columns = min(rows, height), min(columns, width)
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.mean(), xs.mean()) if len(ys) else (height / 2, width / 2)
    top = int(np.clip(round(cy - rows / 2), 0, height - rows))
    left = int(np.clip(round(cx - columns / 2), 0, width - columns))
    return image[top : top + rows, left : left + columns], mask[top : top + rows, left : left + columns]


@torch.no_grad()
def _segment(network: torch.nn.Module, units: Sequence[np.ndarray], letterbox: bool) -> list[np.ndarray]:
    """Each [H, W, 3] unit image's fused probability on its own grid, by the serving graph and the recipe's resize."""
    size = network.config.input_size
    squares = [recipes.resize_unit(unit, size, letterbox) for unit in units]
    images = torch.from_numpy(np.stack([s.transpose(2, 0, 1) for s in squares]))
    seg = network.segment(network.normalize(make_views(images)))
    prob = consensus(seg.fg, seg.geometry, seg.concept, network.config.consensus).prob[:, 0].numpy()
    out = []
    for unit, square, p in zip(units, squares, prob, strict=True):
        box = recipes.content_box(*unit.shape[:2], size, letterbox)
        blank = recipes.is_blank(box.of(square))
        out.append(np.zeros(unit.shape[:2], np.float32) if blank else recipes.to_grid(p, *unit.shape[:2], letterbox))
    return out


def run_dataset(network: torch.nn.Module, path: Path, batch: int, limit: int | None) -> dict[str, Any] | None:
    info, cases = open_dataset(path)
    cases = [c for c in cases if c.split == "test" and c.label_path is not None][:limit]
    if not cases:
        return None
    dice: dict[str, list[float]] = {name: [] for name in RESIZES}
    for start in range(0, len(cases), batch):
        loaded = [load_case(case, info) for case in cases[start : start + batch]]
        crops = [crop(image, mask, aspect) for image, mask in loaded for aspect in ASPECTS]
        for name, letterbox in RESIZES.items():
            probs = _segment(network, [image for image, _ in crops], letterbox)
            for p, (_, mask) in zip(probs, crops, strict=True):
                dice[name].append(float(dice_iou((p >= 0.5)[None], mask[None].astype(bool))[0][0]))
    return {
        "split": SPLIT_NAMES.get(info.split, info.split),
        "crops": len(dice["stretch"]),
        **{f"{name}_dice": float(np.mean(values)) for name, values in dice.items()},
    }


def evaluate_aspect(
    model: str, data: str | Path | Sequence[str | Path], out_json: str | Path, batch: int = 8, limit: int | None = None
) -> dict[str, Any]:
    config, weights, card = resolve(model)
    network = build_c2p(config, checkpoint=weights).eval()
    roots = [data] if isinstance(data, str | Path) else list(data)
    datasets: dict[str, Any] = {}
    for root in roots:
        for path in find_datasets(root) if not (Path(root) / "dataset.json").is_file() else [Path(root)]:
            figures = run_dataset(network, path, batch, limit)
            if figures is not None:
                log.info("%s: stretch %.3f, letterbox %.3f", path.name, figures["stretch_dice"],
                         figures["letterbox_dice"])  # fmt: skip
                datasets[path.name] = figures
    if not datasets:
        raise ValueError(f"no labelled test cases under {', '.join(map(str, roots))}")
    summary = {}
    for split in dict.fromkeys(d["split"] for d in datasets.values()):
        rows = [d for d in datasets.values() if d["split"] == split]
        stretch = float(np.mean([d["stretch_dice"] for d in rows]))
        letterbox = float(np.mean([d["letterbox_dice"] for d in rows]))
        summary[split] = {
            "stretch_dice": stretch,
            "letterbox_dice": letterbox,
            "letterbox_minus_stretch": letterbox - stretch,
        }
    report = {
        "model": model,
        "card_recipe": recipes.Recipe.from_card(card.get("recipe")).resize,
        "aspects": list(ASPECTS),
        "method": "each test case cropped to columns/rows = 2 and 0.5 around its target; Dice per crop on its own "
        "grid, averaged per dataset, then per split; serving graph in PyTorch, content gate, no abstention",
        "datasets": datasets,
        "summary": summary,
    }
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    return report
