"""``c2p evaluate``: Dice and IoU per dataset, with consensus and with one view, and how well the
reliability score predicts quality. Runs the exact serving graph (network + consensus) in PyTorch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import resolve
from models.consensus import consensus, make_views
from models.data.layout import find_datasets, load_case, open_dataset
from models.evaluate.metrics import auroc, dice_iou, spearman
from models.registry import build_c2p
from models.reliability import reliability
from models.train.data import resize_pair

log = logging.getLogger(__name__)
FAILURE_DICE = 0.5


@dataclass
class DatasetResult:
    name: str
    split: str  # "in-domain" or "zero-shot"
    modality: str
    case_ids: list[str]
    dice: np.ndarray
    iou: np.ndarray
    dice_single: np.ndarray
    iou_single: np.ndarray
    score: np.ndarray
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "split": self.split,
            "modality": self.modality,
            "images": len(self.case_ids),
            "dice": float(self.dice.mean()),
            "iou": float(self.iou.mean()),
            "dice_single_view": float(self.dice_single.mean()),
            "iou_single_view": float(self.iou_single.mean()),
        }
        index = {case: i for i, case in enumerate(self.case_ids)}
        groups = {}
        for group, members in self.groups.items():
            rows = [index[m] for m in members if m in index]
            if rows:
                groups[group] = {
                    "images": len(rows),
                    "dice": float(self.dice[rows].mean()),
                    "dice_single_view": float(self.dice_single[rows].mean()),
                }
        if groups:
            out["groups"] = groups
        return out


@torch.no_grad()
def run_dataset(network: torch.nn.Module, path: Path, batch: int, keep: int) -> DatasetResult:
    info, cases = open_dataset(path)
    cases = [c for c in cases if c.split == "test" and c.label_path is not None]
    size = network.config.input_size
    result = DatasetResult(
        info.name, "zero-shot" if info.split == "zero-shot" else "in-domain", info.modality,
        [c.case_id for c in cases], *(np.zeros(len(cases)) for _ in range(5)), groups=dict(info.groups),
    )  # fmt: skip
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        pairs = [resize_pair(*load_case(case, info), size) for case in chunk]
        images = torch.stack([p[0] for p in pairs]).float() / 255
        masks = torch.stack([p[1] for p in pairs])[:, 0].numpy().astype(bool)
        seg = network.segment(network.normalize(make_views(images)))
        fused = consensus(seg.fg, seg.geometry, seg.concept)
        outputs = {k: v.numpy() for k, v in fused._asdict().items()}
        pred = outputs["prob"][:, 0] >= 0.5
        single = torch.sigmoid(seg.fg[: len(chunk), 0]).numpy() >= 0.5
        rows = slice(start, start + len(chunk))
        result.dice[rows], result.iou[rows] = dice_iou(pred, masks)
        result.dice_single[rows], result.iou_single[rows] = dice_iou(single, masks)
        result.score[rows] = reliability(outputs)["score"]
        for i in range(len(chunk)):
            if len(result.samples) < keep:
                image = (images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
                result.samples.append((image, masks[i], pred[i], result.dice[start + i], result.score[start + i]))
    return result


def summarise(results: list[DatasetResult]) -> dict[str, Any]:
    def mean_of(split: str, key: str) -> float | None:
        values = [r.summary()[key] for r in results if r.split == split]
        return float(np.mean(values)) if values else None

    dice = np.concatenate([r.dice for r in results])
    score = np.concatenate([r.score for r in results])
    return {
        "in_domain_mean_dice": mean_of("in-domain", "dice"),
        "in_domain_mean_iou": mean_of("in-domain", "iou"),
        "in_domain_mean_dice_single_view": mean_of("in-domain", "dice_single_view"),
        "zero_shot_mean_dice": mean_of("zero-shot", "dice"),
        "zero_shot_mean_dice_single_view": mean_of("zero-shot", "dice_single_view"),
        "reliability": {
            "images": len(dice),
            "spearman_score_vs_dice": spearman(score, dice),
            "auroc_low_score_flags_dice_below_0.5": auroc(-score, dice < FAILURE_DICE),
            "failures": int((dice < FAILURE_DICE).sum()),
        },
    }


def evaluate(model: str, data: str | Path, out_json: str | Path, report_dir: str | Path | None = None,
             batch: int = 8, gallery: int = 4) -> dict[str, Any]:  # fmt: skip
    config, weights, card = resolve(model)
    network = build_c2p(config, checkpoint=weights).eval()
    paths = find_datasets(data) if not (Path(data) / "dataset.json").is_file() else [Path(data)]
    results = []
    for path in paths:
        result = run_dataset(network, path, batch, keep=gallery)
        if result.case_ids:
            log.info("%s: Dice %.3f (single view %.3f)", result.name, result.dice.mean(), result.dice_single.mean())
            results.append(result)
    if not results:
        raise ValueError(f"no labelled test cases under {data}")
    report = {
        "model": {"variant": config.name, "weights": str(weights) if weights else "random-init",
                  "step": card.get("train", {}).get("step")},
        "datasets": {r.name: r.summary() for r in results},
        "summary": summarise(results),
    }  # fmt: skip
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    if report_dir is not None:
        from models.evaluate.report import write_report

        write_report(report, results, Path(report_dir))
    return report
