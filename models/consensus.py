"""Geometry-aware inference consensus (C2P), as tensor functions that live inside the exported graph.

Three views of each image (identity, horizontal flip, vertical flip) go through the network in one
batch. A view whose mask disagrees with its own predicted geometry is less trustworthy, so each view
is weighted by exp(-5u), u = 10|A - a| + ||C - c|| (measured vs predicted area and centroid), and the
un-flipped probabilities are fused with those weights. The outputs carry what a reliability report
needs: the weights, the inconsistencies, the fused predicted geometry, the measured geometry of the
final mask, how much the views agree, and the fused concept embedding (the concept readout's input).

Weights are taken relative to the best view, w_i = exp(-5 (u_i - min u)), by default: the fusion is the same
wherever exp(-5u) is representable, but when every view has u above about 4 the plain weights all underflow
to 0 and sum(w p) / (sum(w) + 1e-8) erases the mask even where the views agree. The reference's consensus
stays available as ``weighting="reference"`` for imported reference models (``C2PConfig.consensus``): its plain
weights and that denominator, and its measured centroid sum(x p) / sum(p) / W with x = 0..W-1 (ours measures
at pixel centres, x + 1/2, as the GEO targets here are), so an imported model is fused exactly as its own code
fuses it. How far to trust the views is judged from u itself (reliability), never from the relative weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from models.geometry import ATTRIBUTE_SLICES, flip_geometry, measure, soft_area, soft_centroid
from models.variants import CONSENSUS_RULES

VIEWS = ("identity", "hflip", "vflip")
NUM_VIEWS = len(VIEWS)
AREA_WEIGHT = 10.0
WEIGHT_SHARPNESS = 5.0
EMPTY_AREA = 0.001
EMPTY_MEAN_PROB = 0.005
THRESHOLD = 0.5
WEIGHTINGS = CONSENSUS_RULES


class ConsensusOutput(NamedTuple):
    prob: torch.Tensor  # [B, 1, S, S] fused foreground probability (zero where the empty gate fired)
    view_weights: torch.Tensor  # [B, 3] w_i as fused (relative: the best view has 1), in VIEWS order
    view_inconsistency: torch.Tensor  # [B, 3] u_i
    geometry_pred: torch.Tensor  # [B, 14] predicted geometry, un-flipped and fused with the view weights
    geometry_mask: torch.Tensor  # [B, 14] geometry measured on the final mask (prob >= 0.5)
    geometry_valid: torch.Tensor  # [B, 14] bool, which measured values are defined
    view_agreement: torch.Tensor  # [B] mean pairwise soft Dice of the un-flipped views (1 if all see nothing)
    empty_gate: torch.Tensor  # [B] 1.0 where the empty gate suppressed the mask
    concept_embedding: torch.Tensor  # [B, text_dim] the SEM diagnosis head, fused over the views, unit length


OUTPUT_NAMES = ConsensusOutput._fields


def make_views(image: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [3B, C, H, W], view-major: all identities, then h-flips, then v-flips."""
    return torch.cat([image, image.flip(-1), image.flip(-2)], dim=0)


def _unflip_maps(maps: torch.Tensor) -> torch.Tensor:
    """[3, B, ...H, W] view-major maps back to the original frame (each flip is its own inverse)."""
    return torch.stack([maps[0], maps[1].flip(-1), maps[2].flip(-2)], dim=0)


def _unflip_geometry(geometry: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [geometry[0], flip_geometry(geometry[1], horizontal=True), flip_geometry(geometry[2], horizontal=False)]
    )


def pairwise_dice(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[3, B, H, W] view probabilities -> [B] mean soft Dice over the three pairs.

    Soft, so hesitation (pixels near 0.5) lowers agreement, not only flipped decisions. But the soft
    Dice of near-empty maps is decided by background noise (0.01 everywhere gives 0.01), so where no
    view has a single pixel at or above 0.5 the views agree on "nothing here": 1.
    """
    flat = maps.flatten(2)
    sums = flat.sum(-1)
    dice = []
    for i, j in ((0, 1), (0, 2), (1, 2)):
        inter = (flat[i] * flat[j]).sum(-1)
        dice.append((2 * inter + eps) / (sums[i] + sums[j] + eps))
    soft = torch.stack(dice, dim=-1).mean(-1)
    nothing = ~(flat >= THRESHOLD).any(-1).any(0)
    return torch.where(nothing, torch.ones_like(soft), soft)


def view_inconsistency(prob: torch.Tensor, geometry: torch.Tensor, pixel_centres: bool = True) -> torch.Tensor:
    """u = 10|A - a| + ||C - c|| per view; prob [N, H, W] soft masks, geometry [N, 14] of the same views.

    ``pixel_centres=False`` measures C as the reference does (``soft_centroid``).
    """
    area_gap = (soft_area(prob) - geometry[:, ATTRIBUTE_SLICES["area"]].squeeze(-1)).abs()
    measured = soft_centroid(prob, pixel_centres=pixel_centres)
    centroid_gap = torch.linalg.vector_norm(measured - geometry[:, ATTRIBUTE_SLICES["centroid"]], dim=-1)
    return AREA_WEIGHT * area_gap + centroid_gap


def view_weights(u: torch.Tensor, weighting: str = "relative") -> torch.Tensor:
    """[3, B] inconsistencies -> fusion weights (module docstring)."""
    if weighting == "relative":
        return torch.exp(-WEIGHT_SHARPNESS * (u - u.min(dim=0, keepdim=True).values))
    if weighting == "reference":
        return torch.exp(-WEIGHT_SHARPNESS * u)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def consensus(
    fg_logits: torch.Tensor,
    geometry: torch.Tensor,
    concept: torch.Tensor | None = None,
    weighting: str = "relative",
) -> ConsensusOutput:
    """fg_logits [3B, 1, H, W], geometry [3B, 14] and concept embeddings [3B, T] (optional) from the views of
    ``make_views`` -> fused outputs. ``weighting`` is the rule, one of ``WEIGHTINGS`` (module docstring)."""
    n, _, h, w = fg_logits.shape
    b = n // NUM_VIEWS
    prob = torch.sigmoid(fg_logits[:, 0])  # [3B, H, W], each in its own view's frame
    u = view_inconsistency(prob, geometry, pixel_centres=weighting != "reference").reshape(NUM_VIEWS, b)
    weights = view_weights(u, weighting)  # [3, B]
    total = weights.sum(0) + 1e-8
    views = _unflip_maps(prob.reshape(NUM_VIEWS, b, h, w))
    fused = (weights[:, :, None, None] * views).sum(0) / total[:, None, None]

    predicted = _unflip_geometry(geometry.reshape(NUM_VIEWS, b, -1))  # [3, B, 14] in the original frame
    geometry_pred = (weights[..., None] * predicted).sum(0) / total[:, None]
    if concept is None:
        concept = fg_logits.new_zeros(n, 1)
    embedding = (weights[..., None] * concept.reshape(NUM_VIEWS, b, -1)).sum(0) / total[:, None]
    embedding = embedding / embedding.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    mean_area = predicted[..., ATTRIBUTE_SLICES["area"]].squeeze(-1).mean(0)
    gate = ((mean_area < EMPTY_AREA) & (fused.flatten(1).mean(-1) < EMPTY_MEAN_PROB)).to(fused.dtype)
    fused = fused * (1 - gate)[:, None, None]
    geometry_mask, geometry_valid = measure(fused, THRESHOLD)
    return ConsensusOutput(
        prob=fused.unsqueeze(1),
        view_weights=weights.transpose(0, 1),
        view_inconsistency=u.transpose(0, 1),
        geometry_pred=geometry_pred,
        geometry_mask=geometry_mask,
        geometry_valid=geometry_valid,
        view_agreement=pairwise_dice(views),
        empty_gate=gate,
        concept_embedding=embedding,
    )


class Consensus(nn.Module):
    """The consensus step as a module, so the serving graph holds it like any other part."""

    def __init__(self, weighting: str = "relative") -> None:
        super().__init__()
        view_weights(torch.zeros(NUM_VIEWS, 1), weighting)  # refuse an unknown weighting now, not at export
        self.weighting = weighting

    def forward(self, fg_logits: torch.Tensor, geometry: torch.Tensor, concept: torch.Tensor) -> ConsensusOutput:
        return consensus(fg_logits, geometry, concept, self.weighting)
