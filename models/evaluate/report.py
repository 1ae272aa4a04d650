"""What a person reads: a Markdown table, a reliability plot and an overlay gallery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation of {report['model']['variant']}", "", f"Weights: `{report['model']['weights']}`", ""]
    lines += ["| dataset | split | modality | images | Dice | IoU | Dice (1 view) | IoU (1 view) |", "|---" * 8 + "|"]
    for name, r in report["datasets"].items():
        lines.append(
            f"| {name} | {r['split']} | {r['modality']} | {r['images']} | {_fmt(r['dice'])} | {_fmt(r['iou'])} "
            f"| {_fmt(r['dice_single_view'])} | {_fmt(r['iou_single_view'])} |"
        )
        for group, g in r.get("groups", {}).items():
            lines.append(
                f"| &nbsp;&nbsp;{group} | | | {g['images']} | {_fmt(g['dice'])} | | {_fmt(g['dice_single_view'])} | |"
            )
    s = report["summary"]
    rel = s["reliability"]
    in_domain, in_single = _fmt(s["in_domain_mean_dice"]), _fmt(s["in_domain_mean_dice_single_view"])
    zero, zero_single = _fmt(s["zero_shot_mean_dice"]), _fmt(s["zero_shot_mean_dice_single_view"])
    foreign, foreign_single = _fmt(s.get("foreign_mean_dice")), _fmt(s.get("foreign_mean_dice_single_view"))
    rho, auc = _fmt(rel["spearman_score_vs_dice_pooled"]), _fmt(rel["auroc_low_score_flags_dice_below_0.5"])
    lines += [
        "",
        f"- In-domain mean Dice: {in_domain} (single view {in_single})",
        f"- Zero-shot mean Dice: {zero} (single view {zero_single})",
        f"- Foreign-generator mean Dice: {foreign} (single view {foreign_single})",
    ]
    for split in ("negative_healthy", "negative_blank"):
        if split in s:
            entry = s[split]
            flagged = (
                f", empty or flagged low {_fmt(entry['empty_or_flagged_low'])}"
                if "empty_or_flagged_low" in entry
                else ""
            )
            lines.append(f"- {split.replace('_', ' ')}: empty {_fmt(entry['empty'])} of {entry['images']}{flagged}")
    lines += [
        f"- Reliability: Spearman(score, Dice) pooled = {rho}, within-dataset median = "
        f"{_fmt(rel['spearman_within_dataset_median'])}; AUROC of a low score for Dice < 0.5 = {auc} "
        f"({rel['failures']} of {rel['images']} images)",
    ]
    for split, figures in report.get("concepts", {}).items():
        lines.append(f"- Concept readout, {split}: accuracy {_fmt(figures['accuracy'])}, named {_fmt(figures['named'])}"
                     f" of {figures['images']} images with a target")  # fmt: skip
    calibration = report.get("calibration")
    if calibration:
        bounds = ", ".join(f"{e['name']} >= {e['min_score']}" for e in calibration["levels"]["levels"])
        lines.append(f"- Levels (fitted on `{calibration['data']}`): {bounds}; concept threshold "
                     f"{calibration['concept_threshold']}")  # fmt: skip
        for name, kept in calibration["levels"].get("on_test", {}).items():
            good, bad = _fmt(kept["share_dice_at_least_0.8"]), _fmt(kept["share_dice_below_0.5"])
            lines.append(f"  - {name} on the test split: {kept['images']} images, Dice >= 0.8: {good}, < 0.5: {bad}")
    lines += [
        "",
        "![reliability](reliability.png)",
        "",
        "![gallery](gallery.png)",
        "",
    ]
    return "\n".join(lines)


def reliability_plot(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    for r in results:
        ax.scatter(r.score, r.dice, s=10, alpha=0.6, label=r.name, marker="x" if r.split == "zero-shot" else "o")
    ax.set_xlabel("reliability score")
    ax.set_ylabel("Dice")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _outline(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Ground truth outlined in green, prediction in red (yellow where they coincide)."""
    out = image.copy()
    out[_outline(gt)] = (0, 255, 0)
    edge = _outline(pred)
    out[edge] = np.where(_outline(gt)[edge][:, None], (255, 255, 0), (255, 0, 0))
    return out


def gallery(results: list, path: Path, tile: int = 160) -> None:
    rows = [r for r in results if r.samples]
    columns = max(len(r.samples) for r in rows)
    sheet = Image.new("RGB", (columns * tile, len(rows) * (tile + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for y, r in enumerate(rows):
        for x, (image, gt, pred, dice, score) in enumerate(r.samples):
            picture = Image.fromarray(overlay(image, gt, pred)).resize((tile, tile))
            sheet.paste(picture, (x * tile, y * (tile + 14) + 14))
            draw.text((x * tile + 2, y * (tile + 14)), f"{r.name[:14]} D{dice:.2f} R{score:.2f}", fill="black")
    sheet.save(path)


def write_report(report: dict[str, Any], results: list, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(markdown(report))
    reliability_plot(results, folder / "reliability.png")
    gallery(results, folder / "gallery.png")
