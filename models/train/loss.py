"""The C2P loss: segmentation (structure + Dice on fg and bg), masked geometry MSE, semantic cosine.

seg = structure(fg, gt) + structure(bg, 1 - gt) + dice(fg, gt) + dice(bg, 1 - gt), where the
structure loss is a focal BCE (gamma 2) plus a weighted IoU, both weighted by
1 + 5 |avgpool31(gt) - gt| so pixels near boundaries count more (C2P.md, after PraNet).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from models.geometry import ATTRIBUTE_SLICES

FOCAL_GAMMA = 2.0
BOUNDARY_WEIGHT = 5.0
BOUNDARY_KERNEL = 31


class LossParts(NamedTuple):
    total: torch.Tensor
    seg: torch.Tensor
    geo: torch.Tensor
    sem: torch.Tensor


def boundary_weights(gt: torch.Tensor) -> torch.Tensor:
    """1 + 5 |avgpool31(gt) - gt|: near 1 inside flat regions, up to 6 at edges.

    The 31x31 mean (borders excluded from the count) is separable: a 31x1 then a 1x31 mean give the
    same numbers for 2/31 of the work, which matters on a CPU. The weights of 1 - gt are the same, so
    fg and bg share one computation.
    """
    k, pad = BOUNDARY_KERNEL, BOUNDARY_KERNEL // 2
    pooled = F.avg_pool2d(gt, (k, 1), stride=1, padding=(pad, 0), count_include_pad=False)
    pooled = F.avg_pool2d(pooled, (1, k), stride=1, padding=(0, pad), count_include_pad=False)
    return 1 + BOUNDARY_WEIGHT * (pooled - gt).abs()


def structure_loss(logits: torch.Tensor, gt: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Focal BCE + weighted IoU, per image, averaged. logits and gt [B, 1, H, W]."""
    weights = boundary_weights(gt) if weights is None else weights
    bce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
    prob = torch.sigmoid(logits)
    p_true = prob * gt + (1 - prob) * (1 - gt)
    focal = (1 - p_true) ** FOCAL_GAMMA * bce
    wfocal = (weights * focal).sum((2, 3)) / weights.sum((2, 3))
    inter = (prob * gt * weights).sum((2, 3))
    union = ((prob + gt) * weights).sum((2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wfocal + wiou).mean()


def dice_loss(logits: torch.Tensor, gt: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * gt).sum((1, 2, 3))
    return (1 - (2 * inter + smooth) / (prob.sum((1, 2, 3)) + gt.sum((1, 2, 3)) + smooth)).mean()


def segmentation_loss(fg: torch.Tensor, bg: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    background, weights = 1 - gt, boundary_weights(gt)
    structure = structure_loss(fg, gt, weights) + structure_loss(bg, background, weights)
    return structure + dice_loss(fg, gt) + dice_loss(bg, background)


def geometry_loss(predicted: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum over the 9 attributes of the MSE over their valid entries (an attribute with none adds 0)."""
    total = predicted.new_zeros(())
    squared = (predicted - target) ** 2 * valid
    for part in ATTRIBUTE_SLICES.values():
        count = valid[:, part].sum()
        total = total + squared[:, part].sum() / count.clamp(min=1)
    return total


def semantic_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos) between SEM head outputs [B, 9, E] and the sentence embeddings of the 9 fields."""
    return (1 - F.cosine_similarity(predicted, target, dim=-1)).mean()


def c2p_loss(
    outputs: dict[str, torch.Tensor],
    mask: torch.Tensor,
    geometry: torch.Tensor,
    valid: torch.Tensor,
    semantics: torch.Tensor,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> LossParts:
    """Total = seg + geo + sem (the reference weights are all 1). mask [B, 1, H, W] in {0, 1}."""
    fg, bg = outputs["fg"].float(), outputs["bg"].float()
    seg = segmentation_loss(fg, bg, mask)
    geo = geometry_loss(outputs["geometry"].float(), geometry, valid.to(geometry.dtype))
    sem = semantic_loss(outputs["sem"].float(), semantics)
    total = weights[0] * seg + weights[1] * geo + weights[2] * sem
    return LossParts(total, seg.detach(), geo.detach(), sem.detach())
