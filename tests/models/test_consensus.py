"""Consensus weights, fusion and the empty gate on inputs whose answers are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from models.consensus import consensus, make_views
from models.geometry import ATTRIBUTE_SLICES

SIZE = 64
SURE = 30.0  # logit for a pixel the view is sure of: sigmoid(30) = 1 - 1e-13


def square(top: int, left: int, side: int) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE)
    mask[top : top + side, left : left + side] = 1
    return mask


def logits(mask: torch.Tensor) -> torch.Tensor:
    return (mask * 2 - 1) * SURE


def predicted(area: float, cx: float, cy: float) -> torch.Tensor:
    geometry = torch.full((14,), 0.5)
    geometry[ATTRIBUTE_SLICES["area"]] = area
    geometry[ATTRIBUTE_SLICES["centroid"]] = torch.tensor([cx, cy])
    return geometry


def run(views: list[torch.Tensor], geometries: list[torch.Tensor]):
    """One image: three view masks (each in its own view's frame) and three predicted geometries."""
    fg = torch.stack([logits(v) for v in views]).unsqueeze(1)  # [3, 1, H, W], view-major with B = 1
    return consensus(fg, torch.stack(geometries))


# A 16x16 square at rows 8..23, cols 4..19: area 256/4096, centroid ((11.5 + .5)/64, (15.5 + .5)/64).
MASK = square(8, 4, 16)
AREA, CX, CY = 256 / 4096, 12 / 64, 16 / 64


def test_weights_and_inconsistencies_match_hand_computation() -> None:
    views = [MASK, MASK.flip(-1), MASK.flip(-2)]
    geometries = [
        predicted(AREA, CX, CY),  # agrees: u = 0, w = 1
        predicted(AREA + 0.01, 1 - CX, CY),  # area off by 0.01: u = 10 * 0.01 = 0.1, w = exp(-0.5)
        predicted(AREA, CX + 0.03, 1 - CY + 0.04),  # centroid off by (0.03, 0.04): u = 0.05, w = exp(-0.25)
    ]
    out = run(views, geometries)
    torch.testing.assert_close(out.view_inconsistency[0], torch.tensor([0.0, 0.1, 0.05]), atol=1e-5, rtol=0)
    expected = torch.tensor([1.0, math.exp(-0.5), math.exp(-0.25)])
    torch.testing.assert_close(out.view_weights[0], expected, atol=1e-5, rtol=0)
    # All three views show the same square once un-flipped, so the fused mask is that square.
    torch.testing.assert_close(out.prob[0, 0], MASK, atol=1e-6, rtol=0)
    assert out.view_agreement[0] == pytest.approx(1.0, abs=1e-6)
    assert out.empty_gate[0] == 0
    assert out.geometry_mask[0, ATTRIBUTE_SLICES["area"]].item() == pytest.approx(AREA, abs=1e-6)


def test_fusion_is_the_weighted_mean_of_unflipped_views() -> None:
    other = square(40, 40, 8)  # view 2 (v-flip) sees a different object, in its own frame
    views = [MASK, MASK.flip(-1), other]
    geometries = [predicted(AREA, CX, CY), predicted(AREA, 1 - CX, CY), predicted(64 / 4096, 44 / 64, 44 / 64)]
    out = run(views, geometries)
    w = out.view_weights[0]
    torch.testing.assert_close(w, torch.ones(3), atol=1e-5, rtol=0)  # each view agrees with itself
    fused = out.prob[0, 0]
    # Where only views 0 and 1 see the square: 2/3; where only the un-flipped view 2 sees its square: 1/3.
    assert fused[10, 10].item() == pytest.approx(2 / 3, abs=1e-5)
    unflipped_other = other.flip(-2)
    assert fused[unflipped_other.bool()].sub(1 / 3).abs().max() < 1e-5
    # Pairwise soft Dice: (0,1) = 1; (0,2) and (1,2) = 0 (disjoint squares) -> mean 1/3.
    assert out.view_agreement[0].item() == pytest.approx(1 / 3, abs=1e-4)


def test_inconsistent_view_counts_less() -> None:
    other = square(40, 40, 8)
    views = [MASK, MASK.flip(-1), other]
    # View 2 predicts the big square's geometry but shows a small one elsewhere: large u, small weight.
    geometries = [predicted(AREA, CX, CY), predicted(AREA, 1 - CX, CY), predicted(AREA, CX, 1 - CY)]
    out = run(views, geometries)
    area_gap = AREA - 64 / 4096
    centroid_gap = math.dist((44 / 64, 44 / 64), (CX, 1 - CY))
    u2 = 10 * area_gap + centroid_gap
    assert out.view_inconsistency[0, 2].item() == pytest.approx(u2, abs=1e-5)
    w2 = math.exp(-5 * u2)
    assert out.view_weights[0, 2].item() == pytest.approx(w2, abs=1e-6)
    unflipped_other = other.flip(-2).bool()
    assert out.prob[0, 0][unflipped_other].max().item() == pytest.approx(w2 / (2 + w2), abs=1e-5)


def test_empty_gate_fires_only_when_area_and_probability_are_both_tiny() -> None:
    empty = torch.zeros(SIZE, SIZE)
    out = run([empty] * 3, [predicted(0.0, 0.5, 0.5)] * 3)
    assert out.empty_gate[0] == 1 and out.prob.abs().max() == 0
    assert not out.geometry_valid[0, ATTRIBUTE_SLICES["centroid"]].any()
    # Tiny predicted area but a visible mask: the gate must not erase what the views see.
    out = run([MASK, MASK.flip(-1), MASK.flip(-2)], [predicted(0.0, CX, CY)] * 3)
    assert out.empty_gate[0] == 0 and out.prob.max() > 0.99


def test_views_that_all_see_nothing_agree() -> None:
    """Agreement is about decisions: faint background probability (0.01 everywhere) is no disagreement."""
    faint = torch.full((3, 1, SIZE, SIZE), -4.6)  # sigmoid = 0.01
    out = consensus(faint, torch.stack([predicted(0.0, 0.5, 0.5)] * 3))
    assert out.view_agreement[0].item() == 1.0


def test_batch_elements_do_not_mix() -> None:
    torch.manual_seed(0)
    b = 3
    fg = torch.randn(3 * b, 1, SIZE, SIZE) * 4
    geometry = torch.rand(3 * b, 14)
    together = consensus(fg, geometry)
    for i in range(b):
        index = torch.tensor([i, b + i, 2 * b + i])
        alone = consensus(fg[index], geometry[index])
        for name, value in together._asdict().items():
            torch.testing.assert_close(value[i : i + 1], getattr(alone, name), atol=1e-6, rtol=1e-5)


def test_make_views_is_view_major() -> None:
    image = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = make_views(image)
    assert torch.equal(views[:2], image)
    assert torch.equal(views[2:4], image.flip(-1))
    assert torch.equal(views[4:], image.flip(-2))


def test_agreeing_views_survive_when_every_view_is_far_from_its_geometry() -> None:
    """All three u above 4: the reference's exp(-5u) weights underflow in float32 and sum(w p) / (sum(w) + 1e-8)
    erases a mask all views agree on; weights relative to the best view keep it and fuse the same way."""
    views = [MASK, MASK.flip(-1), MASK.flip(-2)]
    far = [predicted(AREA + 2.0, CX, CY), predicted(AREA + 2.1, 1 - CX, CY), predicted(AREA + 2.2, CX, 1 - CY)]
    fg = torch.stack([logits(v) for v in views]).unsqueeze(1)
    out = consensus(fg, torch.stack(far))
    assert out.view_inconsistency[0].min().item() > 4
    torch.testing.assert_close(out.prob[0, 0], MASK, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.view_weights[0], torch.tensor([1.0, math.exp(-5), math.exp(-10)]), atol=1e-6, rtol=0)
    reference = consensus(fg, torch.stack(far), weighting="reference")
    assert reference.prob[0, 0].max().item() < 0.5  # the reference formula wipes it: why it is not the default


def test_the_concept_embedding_is_fused_with_the_view_weights_and_unit_length() -> None:
    views = [MASK, MASK.flip(-1), MASK.flip(-2)]
    geometries = [predicted(AREA, CX, CY), predicted(AREA, 1 - CX, CY), predicted(AREA, CX, 1 - CY)]
    fg = torch.stack([logits(v) for v in views]).unsqueeze(1)
    concept = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 3.0]])
    out = consensus(fg, torch.stack(geometries), concept)
    expected = torch.tensor([6.0, 6.0]) / 3
    torch.testing.assert_close(out.concept_embedding[0], expected / expected.norm(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="weighting"):
        consensus(fg, torch.stack(geometries), concept, weighting="nope")


def test_the_reference_rule_measures_centroids_as_the_reference_does() -> None:
    """The reference's compute_mask_props: cx = sum(x p) / sum(p) / W with x = 0..W-1, no half pixel. Views whose
    GEO heads predict exactly that agree (u = 0, w = exp(0) = 1) under its rule; ours sees them half a pixel off."""
    views = [MASK, MASK.flip(-1), MASK.flip(-2)]
    cx, cy = CX - 0.5 / SIZE, CY - 0.5 / SIZE  # the square's centroid in the reference's convention
    mirrored = 1 - 1 / SIZE  # its mirror image's centroid x' = (W - 1 - x) / W
    geometries = [predicted(AREA, cx, cy), predicted(AREA, mirrored - cx, cy), predicted(AREA, cx, mirrored - cy)]
    reference = run_with(views, geometries, "reference")
    torch.testing.assert_close(reference.view_inconsistency[0], torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(reference.view_weights[0], torch.ones(3), atol=1e-5, rtol=0)
    ours = run_with(views, geometries, "relative")
    half_pixel = math.hypot(0.5 / SIZE, 0.5 / SIZE)
    torch.testing.assert_close(ours.view_inconsistency[0], torch.full((3,), half_pixel), atol=1e-6, rtol=0)


def run_with(views: list[torch.Tensor], geometries: list[torch.Tensor], weighting: str):
    fg = torch.stack([logits(v) for v in views]).unsqueeze(1)
    return consensus(fg, torch.stack(geometries), weighting=weighting)
