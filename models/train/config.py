"""``c2p train --config FILE``: a TOML file with [model], [data], [train], [loss] and [augment] tables."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from models.train.augment import AugmentConfig


@dataclass(frozen=True)
class TrainConfig:
    variant: str
    data: tuple[str, ...]  # dataset folders, or roots holding several (their training datasets are used)
    out: str
    model_overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 2000
    batch_per_dataset: int = 2
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    amp: bool = True  # CUDA only; CPU runs in float32
    threads: int = 0
    # NHWC lets oneDNN run ConvNeXt's convolutions without reordering on every call (faster on CPUs).
    channels_last: bool = True
    checkpoint_every: int = 100
    eval_every: int = 250
    eval_images: int = 24
    cache_dir: str = "runs/cache"
    semantics: bool = True
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    source: str = ""
    # Start from these weights (a shipped or earlier checkpoint) instead of a fresh network; paths
    # relative to the config file. A resumed run ignores it: its own last checkpoint wins.
    init: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["augment"] = {f.name: getattr(self.augment, f.name) for f in fields(AugmentConfig)}
        return out


def _take(table: dict[str, Any], keys: set[str], where: str) -> dict[str, Any]:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ValueError(f"unknown keys in [{where}]: {', '.join(unknown)}")
    return dict(table)


def load_train_config(path: str | Path) -> TrainConfig:
    """Paths in the file are relative to the file, so a config runs the same from any folder."""
    path = Path(path)
    raw = tomllib.loads(path.read_text())
    unknown = sorted(set(raw) - {"model", "data", "train", "loss", "augment"})
    if unknown:
        raise ValueError(f"{path}: unknown tables {', '.join(unknown)}")
    model = dict(raw.get("model", {}))
    if "variant" not in model:
        raise ValueError(f"{path}: [model] needs a variant")
    variant = model.pop("variant")
    data = _take(raw.get("data", {}), {"datasets", "cache_dir"}, "data")
    if not data.get("datasets"):
        raise ValueError(f"{path}: [data] needs datasets = [folders]")
    train_keys = {f.name for f in fields(TrainConfig)} - {"variant", "data", "model_overrides", "augment", "source"}
    train = _take(
        raw.get("train", {}), train_keys - {"cache_dir", "loss_weights", "semantics"} | {"semantics"}, "train"
    )
    loss = _take(raw.get("loss", {}), {"weights"}, "loss")
    augment = _take(raw.get("augment", {}), {f.name for f in fields(AugmentConfig)}, "augment")
    if "intensity_range" in augment:
        augment["intensity_range"] = tuple(augment["intensity_range"])
    base = path.parent

    def resolve(value: str) -> str:
        return str((base / value).resolve()) if not Path(value).is_absolute() else value

    if "out" not in train:
        raise ValueError(f"{path}: [train] needs out = folder")
    train["out"] = resolve(train["out"])
    if train.get("init"):
        train["init"] = resolve(train["init"])
    return TrainConfig(
        variant=variant,
        model_overrides=model,
        data=tuple(resolve(d) for d in data["datasets"]),
        cache_dir=resolve(data.get("cache_dir", "runs/cache")),
        loss_weights=tuple(loss.get("weights", (1.0, 1.0, 1.0))),
        augment=AugmentConfig(**augment),
        source=str(path),
        **train,
    )
