"""Training data in memory: each dataset loaded once, resized to the model's input, with its targets.

Loading PNGs and measuring geometry every step would cost more than the CPU forward pass, so each
dataset is decoded once into uint8 tensors with its geometry and semantic embeddings and cached on
disk (keyed by the files' names, sizes and times, the input size and this module's version).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import recipe as recipes
from models.data.layout import Case, DatasetInfo, load_case, open_dataset
from models.geometry import measure
from models.train.semantics import SentenceEncoder, embed_fields, read_fields, template_fields

CACHE_VERSION = 2
# What ``c2p train`` writes into every checkpoint's card, so the images it learns from are resized by it.
TRAINING_RECIPE = recipes.Recipe()


@dataclass
class TaskData:
    """One dataset at the model's input size. Images [N, 3, S, S] and masks [N, 1, S, S] as uint8."""

    info: DatasetInfo
    case_ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    geometry: torch.Tensor
    valid: torch.Tensor
    semantics: torch.Tensor

    def __len__(self) -> int:
        return len(self.case_ids)


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int, letterbox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """image HxWx3 float [0, 1], mask HxW {0, 1} -> uint8 [3, S, S] and [1, S, S], by the recipe's resize
    (models/recipe.py), the very function the service resizes with; the mask through it, thresholded at 0.5."""
    unit = recipes.resize_unit(np.asarray(image, np.float32), size, letterbox)
    img = torch.from_numpy(np.rint(unit * 255).astype(np.uint8).transpose(2, 0, 1).copy())
    return img, torch.from_numpy(recipes.resize_mask(np.asarray(mask), size, letterbox)[None].copy())


def _fingerprint(cases: list[Case], size: int) -> str:
    digest = hashlib.sha256(f"{CACHE_VERSION}:{size}:{TRAINING_RECIPE.resize}".encode())
    for case in cases:
        for path in (*case.image_paths, case.label_path):
            if path is not None:
                stat = path.stat()
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{case.slice_index}".encode())
    return digest.hexdigest()[:16]


def _semantic_fields(info: DatasetInfo, case: Case, geometry: np.ndarray, valid: np.ndarray) -> dict[str, str]:
    given = info.root / "semantics" / f"{case.case_id}.json"
    if given.is_file():
        return read_fields(given)
    meta = {"modality": info.modality, "target": info.target, "organ": info.organ, "concept": info.concept_name}
    return template_fields(meta, geometry, valid)


def load_task(path: str | Path, split: str, size: int, cache_dir: Path, encoder: SentenceEncoder | None) -> TaskData:
    """Decode, resize and measure every case of one split ("train" or "test"), through the disk cache."""
    info, cases = open_dataset(path)
    cases = [c for c in cases if c.split == split and c.label_path is not None]
    if not cases:
        raise ValueError(f"{info.root}: no labelled {split} cases")
    cache = cache_dir / f"{info.name}-{split}-{size}-{_fingerprint(cases, size)}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            arrays = {k: torch.from_numpy(data[k]) for k in ("images", "masks", "geometry", "valid", "semantics")}
            return TaskData(info, json.loads(str(data["case_ids"])), **arrays)
    letterbox = TRAINING_RECIPE.letterbox
    images, masks = zip(*(resize_pair(*load_case(case, info), size, letterbox) for case in cases), strict=True)
    image_t, mask_t = torch.stack(images), torch.stack(masks)
    geometry, valid = measure(mask_t[:, 0].float())
    if encoder is not None:
        fields = [
            _semantic_fields(info, c, g, v) for c, g, v in zip(cases, geometry.numpy(), valid.numpy(), strict=True)
        ]
        semantics = torch.from_numpy(embed_fields(encoder, fields))
    else:
        semantics = torch.zeros(len(cases), 9, 384, dtype=torch.float16)
    task = TaskData(info, [c.case_id for c in cases], image_t, mask_t, geometry, valid, semantics)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        images=image_t.numpy(),
        masks=mask_t.numpy(),
        geometry=geometry.numpy(),
        valid=valid.numpy(),
        semantics=semantics.numpy(),
        case_ids=np.array(json.dumps(task.case_ids)),
    )
    tmp.replace(cache)
    return task


class MultiTaskSampler:
    """One batch from every dataset per step, each dataset walked in its own shuffled epochs."""

    def __init__(self, tasks: list[TaskData], batch_per_task: int, generator: torch.Generator) -> None:
        self.tasks, self.batch, self.generator = tasks, batch_per_task, generator
        self._orders: list[list[int]] = [[] for _ in tasks]

    def _take(self, t: int) -> list[int]:
        order = self._orders[t]
        while len(order) < self.batch:
            order.extend(torch.randperm(len(self.tasks[t]), generator=self.generator).tolist())
        taken, self._orders[t] = order[: self.batch], order[self.batch :]
        return taken

    def state(self) -> list[list[int]]:
        return [list(order) for order in self._orders]

    def load_state(self, orders: list[list[int]]) -> None:
        self._orders = [list(order) for order in orders]

    def next(self) -> dict[str, torch.Tensor]:
        parts = {k: [] for k in ("images", "masks", "geometry", "valid", "semantics", "task")}
        for t, task in enumerate(self.tasks):
            index = torch.tensor(self._take(t))
            parts["images"].append(task.images[index].float() / 255)
            parts["masks"].append(task.masks[index].float())
            parts["geometry"].append(task.geometry[index])
            parts["valid"].append(task.valid[index])
            parts["semantics"].append(task.semantics[index].float())
            parts["task"].append(torch.full((len(index),), t))
        return {k: torch.cat(v) for k, v in parts.items()}
