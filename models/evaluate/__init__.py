"""``c2p evaluate``: Dice and IoU per dataset, with consensus and with one view, and how well the
reliability score predicts quality. Runs the exact serving graph (network + consensus) in PyTorch, with the
service's content gate, on images made by the recipe the service applies (models/recipe.py).

Figures are kept apart by where the data comes from: in-domain (the training generator's test split), zero-shot
(its held-out tasks), foreign (models/evaluate/foreign.py: code the model was never built from), and negatives
(healthy and blank: how often the answer is "nothing here"). ``service/evaluation.py`` runs the same test cases
as files through the service's own decode, preprocess, engine and report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import recipe as recipes
from models.checkpoint import resolve
from models.concepts import NO_FINDING, load_vocabulary, read_out, vocabulary_card
from models.consensus import consensus, make_views
from models.data.layout import find_datasets, load_case, open_dataset
from models.evaluate.calibration import fit_abstention, fit_concept_threshold, fit_levels, kept_promises, level_of
from models.evaluate.metrics import auroc, dice_iou, spearman
from models.registry import build_c2p
from models.reliability import abstain_bound, abstains, reliability
from models.train.data import resize_pair

log = logging.getLogger(__name__)
FAILURE_DICE = 0.5


SPLIT_NAMES = {"train": "in-domain"}  # a dataset's c2p split -> the family its figures are reported under
NEGATIVE = ("negative-healthy", "negative-blank")


@dataclass
class DatasetResult:
    name: str
    split: str  # in-domain, zero-shot, foreign, negative-healthy, negative-blank
    modality: str
    concept: str
    case_ids: list[str]
    dice: np.ndarray
    iou: np.ndarray
    dice_single: np.ndarray
    iou_single: np.ndarray
    score: np.ndarray
    empty_pred: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    empty_true: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    abstained: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    embedding: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "split": self.split,
            "modality": self.modality,
            "concept": self.concept,
            "images": len(self.case_ids),
            "dice": float(self.dice.mean()),
            "iou": float(self.iou.mean()),
            "dice_single_view": float(self.dice_single.mean()),
            "iou_single_view": float(self.iou_single.mean()),
            "empty_predicted": float(self.empty_pred.mean()) if len(self.empty_pred) else None,
            "abstained": float(self.abstained.mean()) if len(self.abstained) else 0.0,
            "spearman_score_vs_dice": spearman(self.score, self.dice),
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


def _plane_groups(info: Any, case_ids: list[str]) -> dict[str, tuple[str, ...]]:
    """Groups given by the dataset, else by the plane its case metadata names (MRI)."""
    if info.groups:
        return dict(info.groups)
    cases_file = info.root / "c2p_cases.json"
    if not cases_file.is_file():
        return {}
    groups: dict[str, list[str]] = {}
    for meta in json.loads(cases_file.read_text()):
        if "plane" in meta and meta.get("case") in case_ids:
            groups.setdefault(meta["plane"], []).append(meta["case"])
    return {k: tuple(v) for k, v in groups.items()}


@torch.no_grad()
def run_dataset(network: torch.nn.Module, path: Path, batch: int, keep: int, recipe: recipes.Recipe) -> DatasetResult:
    """The test split of one dataset through the serving graph in PyTorch, resized by the model's own recipe, with
    the service's content gate (on each image's content box)."""
    info, cases = open_dataset(path)
    cases = [c for c in cases if c.split == "test" and c.label_path is not None]
    size = network.config.input_size
    ids = [c.case_id for c in cases]
    n = len(cases)
    result = DatasetResult(
        info.name, SPLIT_NAMES.get(info.split, info.split), info.modality, info.concept_name, ids,
        *(np.zeros(n) for _ in range(5)), empty_pred=np.zeros(n, bool), empty_true=np.zeros(n, bool),
        embedding=np.zeros((n, network.config.text_dim), np.float32), groups=_plane_groups(info, ids),
    )  # fmt: skip
    for start in range(0, n, batch):
        chunk = cases[start : start + batch]
        loaded = [load_case(case, info) for case in chunk]
        pairs = [resize_pair(image, mask, size, recipe.letterbox) for image, mask in loaded]
        images = torch.stack([p[0] for p in pairs]).float() / 255
        masks = torch.stack([p[1] for p in pairs])[:, 0].numpy().astype(bool)
        boxes = [recipes.content_box(*mask.shape[:2], size, recipe.letterbox) for _, mask in loaded]
        blank = np.array(
            [recipes.is_blank(box.of(img.permute(1, 2, 0).numpy())) for img, box in zip(images, boxes, strict=True)]
        )
        seg = network.segment(network.normalize(make_views(images)))
        fused = consensus(seg.fg, seg.geometry, seg.concept, network.config.consensus)  # the serving graph's rule
        outputs = {k: v.numpy() for k, v in fused._asdict().items()}
        pred = (outputs["prob"][:, 0] >= 0.5) & ~blank[:, None, None]
        single = (torch.sigmoid(seg.fg[: len(chunk), 0]).numpy() >= 0.5) & ~blank[:, None, None]
        rows = slice(start, start + len(chunk))
        result.dice[rows], result.iou[rows] = dice_iou(pred, masks)
        result.dice_single[rows], result.iou_single[rows] = dice_iou(single, masks)
        result.score[rows] = np.where(blank, 1.0, reliability(outputs)["score"])
        result.empty_pred[rows] = ~pred.reshape(len(chunk), -1).any(-1)
        result.empty_true[rows] = ~masks.reshape(len(chunk), -1).any(-1)
        result.embedding[rows] = outputs["concept_embedding"]
        for i in range(len(chunk)):
            if len(result.samples) < keep:
                image = (images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
                result.samples.append((image, masks[i], pred[i], result.dice[start + i], result.score[start + i]))
    return result


def apply_abstention(result: DatasetResult, bound: float) -> None:
    """What the service returns for findings scored below the card's bound (models/reliability.py): an empty mask,
    so Dice 1 where nothing was there and 0 where something was, in both the fused and the single-view figures."""
    dropped = abstains(result.score, ~result.empty_pred, bound)
    answer = result.empty_true.astype(float)
    for values in (result.dice, result.iou, result.dice_single, result.iou_single):
        values[dropped] = answer[dropped]
    result.empty_pred = result.empty_pred | dropped
    result.abstained = dropped
    for i, (image, mask, pred, _, score) in enumerate(result.samples):
        if dropped[i]:
            result.samples[i] = (image, mask, np.zeros_like(pred), result.dice[i], score)


def _mean(results: list[DatasetResult], split: str, key: str) -> float | None:
    values = [r.summary()[key] for r in results if r.split == split]
    return float(np.mean(values)) if values else None


def _group_dice(results: list[DatasetResult], split: str, group: str) -> float | None:
    values = [r.summary().get("groups", {}).get(group, {}).get("dice") for r in results if r.split == split]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(results: list[DatasetResult], levels: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's figures. Reliability is judged on images with a target or a real-looking scene (negatives of
    the blank kind are answered by the content gate, not the score)."""
    scored = [r for r in results if r.split != "negative-blank"]
    dice = np.concatenate([r.dice for r in scored])
    score = np.concatenate([r.score for r in scored])
    within = {r.name: r.summary()["spearman_score_vs_dice"] for r in results if r.split == "in-domain"}
    finite = [v for v in within.values() if np.isfinite(v)]
    out: dict[str, Any] = {
        "in_domain_mean_dice": _mean(results, "in-domain", "dice"),
        "in_domain_mean_iou": _mean(results, "in-domain", "iou"),
        "in_domain_mean_dice_single_view": _mean(results, "in-domain", "dice_single_view"),
        "zero_shot_mean_dice": _mean(results, "zero-shot", "dice"),
        "zero_shot_mean_dice_single_view": _mean(results, "zero-shot", "dice_single_view"),
        "foreign_mean_dice": _mean(results, "foreign", "dice"),
        "foreign_mean_dice_single_view": _mean(results, "foreign", "dice_single_view"),
        "brain_tumour_planes": {
            plane: {split: _group_dice(results, split, plane) for split in ("in-domain", "foreign")}
            for plane in ("axial", "coronal", "sagittal")
        },
        "reliability": {
            "images": len(dice),
            "spearman_score_vs_dice_pooled": spearman(score, dice),
            "spearman_within_dataset_median": float(np.median(finite)) if finite else None,
            "spearman_within_dataset": within,
            "auroc_low_score_flags_dice_below_0.5": auroc(-score, dice < FAILURE_DICE),
            "failures": int((dice < FAILURE_DICE).sum()),
        },
    }
    out["abstained"] = {
        split: float(np.concatenate([r.abstained for r in rows]).mean())
        for split in ("in-domain", "zero-shot", "foreign", *NEGATIVE)
        if (rows := [r for r in results if r.split == split and len(r.abstained)])
    }
    for split in ("in-domain", "zero-shot", "foreign"):
        a, b = out[f"{split.replace('-', '_')}_mean_dice"], out[f"{split.replace('-', '_')}_mean_dice_single_view"]
        out[f"{split.replace('-', '_')}_consensus_minus_single_view"] = None if a is None else a - b
    for split in NEGATIVE:
        rows = [r for r in results if r.split == split]
        if rows:
            empty = np.concatenate([r.empty_pred for r in rows])
            entry: dict[str, Any] = {"images": len(empty), "empty": float(empty.mean())}
            if levels is not None:
                low = np.concatenate([level_of(r.score, levels) == "low" for r in rows])
                entry["empty_or_flagged_low"] = float((empty | low).mean())
            out[split.replace("-", "_")] = entry
    return out


def _targets(results: list[DatasetResult]):
    """(dataset result, fused concept embedding) of every image with a target."""
    for r in results:
        for embedding, empty_true in zip(r.embedding, r.empty_true, strict=True):
            if not empty_true:
                yield r, embedding


def concept_figures(results: list[DatasetResult], vocabulary: dict[str, Any]) -> dict[str, Any]:
    """Concept accuracy on images with a target (the readout's nearest name against the dataset's concept)."""
    concepts, threshold = load_vocabulary(vocabulary)
    figures: dict[str, Any] = {}
    for split in ("in-domain", "zero-shot", "foreign"):
        names = [(read_out(e, concepts, threshold, empty=False).name, r.concept)
                 for r, e in _targets([r for r in results if r.split == split])]  # fmt: skip
        if names:
            figures[split] = {
                "images": len(names),
                "named": sum(said != "unknown" for said, _ in names) / len(names),
                "accuracy": sum(said == truth for said, truth in names) / len(names),
            }
    return figures


def _nearest(results: list[DatasetResult], vocabulary: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(similarity to the nearest name, whether it is the dataset's concept) of every image with a target."""
    concepts, _ = load_vocabulary(vocabulary)
    readouts = [(read_out(e, concepts, -1.0, empty=False), r.concept) for r, e in _targets(results)]
    return np.asarray([o.similarity for o, _ in readouts]), np.asarray([o.name == t for o, t in readouts], bool)


def build_vocabulary(results: list[DatasetResult], cache_dir: Path) -> dict[str, Any]:
    """The in-domain datasets' concept names and NO_FINDING, embedded with the training encoder."""
    from models.train.semantics import ENCODER, SentenceEncoder

    names = [*sorted({r.concept for r in results if r.split == "in-domain" and r.concept}), NO_FINDING]
    table = SentenceEncoder(cache_dir).encode(names)
    return vocabulary_card(names, np.stack([table[n] for n in names]), 1.0, ENCODER)


def _run_all(
    network: torch.nn.Module, data: Sequence[str | Path], batch: int, keep: int, recipe: recipes.Recipe
) -> list[DatasetResult]:
    results = []
    for root in data:
        paths = find_datasets(root) if not (Path(root) / "dataset.json").is_file() else [Path(root)]
        for path in paths:
            result = run_dataset(network, path, batch, keep, recipe)
            if result.case_ids:
                log.info("%s (%s): Dice %.3f (single view %.3f)", result.name, result.split, result.dice.mean(),
                         result.dice_single.mean())  # fmt: skip
                results.append(result)
    return results


def evaluate(
    model: str,
    data: str | Path | Sequence[str | Path],
    out_json: str | Path,
    report_dir: str | Path | None = None,
    batch: int = 8,
    gallery: int = 4,
    calibration: str | Path | None = None,
    cache_dir: str | Path = "runs/cache",
) -> dict[str, Any]:
    """Every figure of the card: per dataset and family, concepts, and (with ``calibration``, data the test split
    is not) the reliability levels, the abstention bound and the concept threshold, fitted there and judged here.
    Without it the card's own abstention bound applies, as it does in the service."""
    config, weights, card = resolve(model)
    network = build_c2p(config, checkpoint=weights).eval()
    data = [data] if isinstance(data, str | Path) else list(data)
    recipe = recipes.Recipe.from_card(card.get("recipe"))
    results = _run_all(network, data, batch, gallery, recipe)
    if not results:
        raise ValueError(f"no labelled test cases under {', '.join(map(str, data))}")
    levels = None
    vocabulary = None
    extra: dict[str, Any] = {}
    if calibration is None:  # the card's own bound, as the service applies it
        for r in results:
            apply_abstention(r, abstain_bound(card.get("reliability")))
    else:
        held = _run_all(network, [calibration], batch, 0, recipe)
        scored = [r for r in held if r.split != "negative-blank"]
        bound = fit_abstention(*(np.concatenate(a) for a in zip(
            *((r.score, r.dice, ~r.empty_pred, r.empty_true) for r in scored), strict=True)))  # fmt: skip
        for r in held + results:
            apply_abstention(r, bound)
        levels = fit_levels(np.concatenate([r.score for r in scored]), np.concatenate([r.dice for r in scored]))
        levels["abstain_below"] = bound
        vocabulary = build_vocabulary(held + results, Path(cache_dir))
        similarity, right = _nearest([r for r in held if r.split == "in-domain"], vocabulary)
        vocabulary["threshold"] = round(fit_concept_threshold(similarity, right), 4)
        test = [r for r in results if r.split != "negative-blank"]
        levels["on_test"] = kept_promises(
            np.concatenate([r.score for r in test]), np.concatenate([r.dice for r in test]), levels
        )
        extra = {
            "calibration": {"data": str(calibration), "levels": levels, "concept_threshold": vocabulary["threshold"],
                            "abstain_below": bound},
            "concepts": concept_figures(results, vocabulary),
        }  # fmt: skip
    report = {
        "model": {"variant": config.name, "weights": str(weights) if weights else "random-init",
                  "step": card.get("train", {}).get("step")},
        "datasets": {r.name: r.summary() for r in results},
        "summary": summarise(results, levels),
        **extra,
    }  # fmt: skip
    if vocabulary is not None:
        report["vocabulary"] = vocabulary
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    if report_dir is not None:
        from models.evaluate.report import write_report

        write_report(report, results, Path(report_dir))
    return report
