"""``c2p train``: the C2P recipe, one batch from every dataset per step, resumable at any checkpoint.

The per-dataset batches go through the network as one batch (one forward, better use of the CPU);
the loss is computed per dataset and averaged, which averages the gradients over datasets as the
reference does. Checkpoints are safetensors + a JSON card; the optimiser, sampler and random states
sit beside them so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import read_tensors, save_checkpoint
from models.data.layout import find_datasets, open_dataset
from models.registry import build_c2p, get_config
from models.train.augment import augment
from models.train.config import TrainConfig
from models.train.data import TRAINING_RECIPE, MultiTaskSampler, TaskData, load_task
from models.train.loss import c2p_loss
from models.train.semantics import SentenceEncoder

log = logging.getLogger(__name__)


def training_datasets(entries: tuple[str, ...]) -> list[Path]:
    """Dataset folders, or roots whose datasets marked split = "train" are all used."""
    found: list[Path] = []
    for entry in entries:
        path = Path(entry)
        candidates = [path] if (path / "dataset.json").is_file() else find_datasets(path)
        for candidate in candidates:
            info, _ = open_dataset(candidate)
            if info.split == "train" or candidate == path:
                found.append(candidate)
    if not found:
        raise ValueError(f"no training datasets found in {', '.join(entries)}")
    return sorted(found)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    ratio = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * ratio


def dice_scores(prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image Dice of prob >= 0.5 against the mask; two empty masks score 1 (nothing to find, nothing found)."""
    pred = (prob >= 0.5).float().flatten(1)
    gt = mask.float().flatten(1)
    inter, total = (pred * gt).sum(1), pred.sum(1) + gt.sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


@torch.no_grad()
def quick_eval(network: torch.nn.Module, tasks: list[TaskData], limit: int, device: torch.device) -> dict[str, float]:
    """Single-view mean Dice on the first ``limit`` test images of each dataset: a progress signal only."""
    network.eval()
    scores = {}
    for task in tasks:
        images = task.images[:limit].float().div(255).to(device)
        prob = torch.sigmoid(network.segment(network.normalize(images)).fg)
        scores[task.info.name] = float(dice_scores(prob.cpu()[:, 0], task.masks[:limit, 0]).mean())
    network.train()
    return scores


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.config, self.progress = config, progress
        self.out = Path(config.out)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.model_config = get_config(config.variant, **config.model_overrides)
        size = self.model_config.input_size
        cache = Path(config.cache_dir)
        encoder = SentenceEncoder(cache) if config.semantics else None
        paths = training_datasets(config.data)
        self.tasks = [load_task(p, "train", size, cache, encoder) for p in paths]
        self.eval_tasks = [load_task(p, "test", size, cache, None) for p in paths if self._has_test(p)]
        self.network = build_c2p(self.model_config).to(self.device).train()
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.network = self.network.to(memory_format=self.memory_format)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.sampler = MultiTaskSampler(self.tasks, config.batch_per_dataset, self.generator)
        self.step = 0
        if resume and (self.out / "last.safetensors").is_file():
            self._resume()
        elif config.init:
            self.network.load_state_dict(read_tensors(config.init), strict=True)
            log.info("initialised from %s", config.init)

    @staticmethod
    def _has_test(path: Path) -> bool:
        _, cases = open_dataset(path)
        return any(c.split == "test" and c.label_path is not None for c in cases)

    def _autocast(self):
        enabled = self.config.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self) -> dict[str, float]:
        batch = self.sampler.next()
        images, masks, geometry, valid = augment(
            batch["images"], batch["masks"], batch["geometry"], batch["valid"], self.config.augment, self.generator
        )
        images, masks = images.to(self.device, memory_format=self.memory_format), masks.to(self.device)
        geometry, valid = geometry.to(self.device), valid.to(self.device)
        semantics, task = batch["semantics"].to(self.device), batch["task"]
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.config)
        with self._autocast():
            outputs = self.network(self.network.normalize(images))
        parts = []
        for t in range(len(self.tasks)):
            index = (task == t).nonzero().squeeze(1).to(self.device)
            picked = {k: v[index] for k, v in outputs.items()}
            parts.append(
                c2p_loss(
                    picked, masks[index], geometry[index], valid[index], semantics[index], self.config.loss_weights
                )
            )
        loss = torch.stack([p.total for p in parts]).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        mean = {name: float(torch.stack([getattr(p, name) for p in parts]).mean()) for name in ("seg", "geo", "sem")}
        return {"loss": float(loss.detach()), **mean, "lr": self.optimizer.param_groups[0]["lr"]}

    def card(self) -> dict[str, Any]:
        return {
            "train": {
                "step": self.step,
                "config": self.config.to_dict(),
                "datasets": [t.info.name for t in self.tasks],
                "images": {t.info.name: len(t) for t in self.tasks},
            },
            "recipe": TRAINING_RECIPE.to_card(),
        }

    def save(self, name: str = "last") -> Path:
        path = save_checkpoint(self.network, self.out / f"{name}.safetensors", self.model_config, self.card())
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.out / f"{name}.state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.out / f"{name}.state.pt")
        return path

    def _resume(self) -> None:
        self.network.load_state_dict(read_tensors(self.out / "last.safetensors"), strict=True)
        state = torch.load(self.out / "last.state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state(state["sampler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        log.info("resumed %s at step %d", self.out, self.step)

    def run(self, until: int | None = None) -> Path:
        """Train to the configured number of steps (or stop early at ``until``, as a stopped run would)."""
        from tqdm import tqdm

        last = self.config.steps if until is None else min(until, self.config.steps)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train.json").write_text(json.dumps(self.config.to_dict(), indent=2, default=list) + "\n")
        bar = tqdm(total=self.config.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True)
        started, first = time.perf_counter(), self.step
        with open(self.out / "log.jsonl", "a") as log_file:
            while self.step < last:
                metrics = self.train_step()
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()})
                record: dict[str, Any] = {"step": self.step, **metrics}
                if self.step % self.config.eval_every == 0 or self.step == self.config.steps:
                    dice = quick_eval(self.network, self.eval_tasks, self.config.eval_images, self.device)
                    record["dice"] = dice
                    record["mean_dice"] = sum(dice.values()) / max(1, len(dice))
                    log.info("step %d mean single-view Dice %.3f", self.step, record["mean_dice"])
                images = (self.step - first) * len(self.tasks) * self.config.batch_per_dataset
                record["images_per_s"] = images / (time.perf_counter() - started)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if self.step % self.config.checkpoint_every == 0:
                    self.save()
        bar.close()
        path = self.save()
        return self.save("final") if self.step >= self.config.steps else path
