"""models.geometry against skimage.measure.regionprops, and the properties its three callers rely on.

The training targets, the consensus inside the exported graph and the reliability report all use
``measure``; if it drifts from regionprops, from its own flips, or between eager, TorchScript and
ONNX Runtime, predicted and measured geometry stop being comparable.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.draw import ellipse, line, polygon
from skimage.measure import regionprops

from models.geometry import (
    ATTRIBUTE_SLICES,
    ATTRIBUTES,
    GEOMETRY_FIELDS,
    NUM_GEOMETRY,
    flip_geometry,
    measure,
    orientation_from_angle,
    soft_area,
    soft_centroid,
)

H, W = 96, 112  # not square, so that a swapped axis shows
ISOTROPY = 0.05

# Absolute tolerances per field. Solidity is allowed 0.03 by the spec; the hull here is exact, so
# the test holds it to float error and fails loudly if either side changes.
TOL = {
    "bbox_xmin": 1e-6,
    "bbox_ymin": 1e-6,
    "bbox_xmax": 1e-6,
    "bbox_ymax": 1e-6,
    "area": 1e-6,
    "perimeter": 1e-5,
    "aspect_ratio": 1e-5,
    "compactness": 1e-5,
    "centroid_x": 1e-6,
    "centroid_y": 1e-6,
    "eccentricity": 1e-5,
    "orientation_sin": 1e-4,
    "orientation_cos": 1e-4,
    "solidity": 1e-6,
}


def _blank() -> np.ndarray:
    return np.zeros((H, W), dtype=bool)


def _ellipse(r: float, c: float, r_radius: float, c_radius: float, rotation: float = 0.0) -> np.ndarray:
    m = _blank()
    rr, cc = ellipse(r, c, r_radius, c_radius, shape=m.shape, rotation=rotation)
    m[rr, cc] = True
    return m


def _polygon(points: list[tuple[float, float]]) -> np.ndarray:
    m = _blank()
    pts = np.asarray(points, dtype=float)
    rr, cc = polygon(pts[:, 0], pts[:, 1], shape=m.shape)
    m[rr, cc] = True
    return m


def _rotated_rectangle(r: float, c: float, half_r: float, half_c: float, angle: float) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [(-half_r, -half_c), (-half_r, half_c), (half_r, half_c), (half_r, -half_c)]
    return _polygon([(r + dr * cos - dc * sin, c + dr * sin + dc * cos) for dr, dc in corners])


def _box(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = _blank()
    m[r0:r1, c0:c1] = True
    return m


def _line(r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
    m = _blank()
    rr, cc = line(r0, c0, r1, c1)
    m[rr, cc] = True
    return m


def _shapes() -> dict[str, np.ndarray]:
    shapes = {
        "ellipse_flat": _ellipse(48, 56, 12, 30),
        "ellipse_tall": _ellipse(48, 56, 40, 10),
        "ellipse_rot_0.4": _ellipse(50, 60, 30, 12, 0.4),
        "ellipse_rot_-1.1": _ellipse(45, 50, 20, 35, -1.1),
        "ellipse_rot_2.0": _ellipse(48, 56, 40, 6, 2.0),
        "ellipse_rot_pi/4": _ellipse(48, 56, 25, 9, math.pi / 4),
        "ellipse_small": _ellipse(30, 30, 5, 3, 0.7),
        "circle": _ellipse(48, 56, 20, 20),
        "rectangle": _box(10, 40, 20, 90),
        "square": _box(30, 60, 40, 70),
        "rotated_rect_0.3": _rotated_rectangle(48, 56, 30, 10, 0.3),
        "rotated_rect_1.0": _rotated_rectangle(48, 56, 8, 35, 1.0),
        "triangle": _polygon([(5, 10), (80, 30), (40, 100)]),
        "l_shape": _box(10, 80, 10, 30) | _box(60, 80, 10, 90),
        "ring": _ellipse(48, 56, 30, 30) & ~_ellipse(48, 56, 22, 22),
        "components": _ellipse(20, 20, 8, 12, 0.3) | _box(60, 90, 70, 100) | _ellipse(75, 30, 5, 5),
        "diagonal_line": _line(5, 3, 90, 100),
        "row": _box(40, 41, 10, 90),
        "column": _box(5, 90, 60, 61),
        "two_pixels": _box(40, 41, 50, 52),
        "single_pixel": _box(17, 18, 23, 24),
        "border_box": _box(0, 20, 0, 30),
        "border_ellipse": _ellipse(90, 105, 20, 30, 0.5),
        "all_ones": np.ones((H, W), dtype=bool),
    }
    rng = np.random.default_rng(7)
    shapes["noise"] = rng.random((H, W)) < 0.05
    return shapes


SHAPES = _shapes()


def _reference(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """regionprops of the whole mask as one region, normalised like measure(); and the validity."""
    height, width = m.shape
    region = regionprops(m.astype(np.uint8))[0]
    r0, c0, r1, c1 = region.bbox
    l1, l2 = region.inertia_tensor_eigvals
    has_axes = region.area >= 2 and l1 > 0
    theta = region.orientation
    row = {
        "bbox_xmin": c0 / width,
        "bbox_ymin": r0 / height,
        "bbox_xmax": c1 / width,
        "bbox_ymax": r1 / height,
        "area": region.area / (height * width),
        "perimeter": min(region.perimeter / (2 * (height + width)), 1.0),
        "aspect_ratio": region.axis_minor_length / region.axis_major_length if has_axes else 0.0,
        "compactness": min(4 * math.pi * region.area / region.perimeter**2, 1.0) if region.perimeter else 1.0,
        "centroid_x": (region.centroid[1] + 0.5) / width,
        "centroid_y": (region.centroid[0] + 0.5) / height,
        "eccentricity": region.eccentricity,
        "orientation_sin": (math.sin(2 * theta) + 1) / 2,
        "orientation_cos": (math.cos(2 * theta) + 1) / 2,
        "solidity": region.solidity,
    }
    valid = dict.fromkeys(GEOMETRY_FIELDS, True)
    valid["aspect_ratio"] = valid["eccentricity"] = has_axes
    oriented = has_axes and (l1 - l2) / (l1 + l2) >= ISOTROPY
    valid["orientation_sin"] = valid["orientation_cos"] = oriented
    return np.array([row[f] for f in GEOMETRY_FIELDS]), np.array([valid[f] for f in GEOMETRY_FIELDS])


def _measure_np(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, valid = measure(torch.from_numpy(m)[None])
    return values[0].double().numpy(), valid[0].numpy()


def test_layout_constants() -> None:
    assert NUM_GEOMETRY == len(GEOMETRY_FIELDS) == 14
    assert sum(width for _, width in ATTRIBUTES) == NUM_GEOMETRY
    assert [name for name, _ in ATTRIBUTES] == list(ATTRIBUTE_SLICES)
    assert GEOMETRY_FIELDS[ATTRIBUTE_SLICES["bbox"]] == ("bbox_xmin", "bbox_ymin", "bbox_xmax", "bbox_ymax")
    assert GEOMETRY_FIELDS[ATTRIBUTE_SLICES["centroid"]] == ("centroid_x", "centroid_y")
    assert GEOMETRY_FIELDS[ATTRIBUTE_SLICES["orientation"]] == ("orientation_sin", "orientation_cos")
    assert GEOMETRY_FIELDS[ATTRIBUTE_SLICES["solidity"]] == ("solidity",)


@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_regionprops(name: str) -> None:
    m = SHAPES[name]
    values, valid = _measure_np(m)
    expected, expected_valid = _reference(m)
    assert valid.tolist() == expected_valid.tolist()
    for j, field in enumerate(GEOMETRY_FIELDS):
        if valid[j]:
            assert abs(values[j] - expected[j]) <= TOL[field], (name, field, values[j], expected[j])
        else:
            assert values[j] == 0.0, (name, field)


def test_isotropic_shapes_have_no_orientation() -> None:
    for name in ("circle", "square", "single_pixel"):
        _, valid = _measure_np(SHAPES[name])
        assert not valid[ATTRIBUTE_SLICES["orientation"]].any(), name
    # A circle still has axes: aspect ratio near 1, eccentricity near 0.
    values, valid = _measure_np(SHAPES["circle"])
    assert valid[ATTRIBUTE_SLICES["aspect_ratio"]].all() and values[ATTRIBUTE_SLICES["aspect_ratio"]] > 0.95


def test_solidity_of_non_convex_shapes() -> None:
    for name in ("l_shape", "ring", "components"):
        values, _ = _measure_np(SHAPES[name])
        assert values[GEOMETRY_FIELDS.index("solidity")] < 0.7, name
    values, _ = _measure_np(SHAPES["rectangle"])
    assert values[GEOMETRY_FIELDS.index("solidity")] == 1.0


def test_empty_mask_only_area_is_valid() -> None:
    values, valid = measure(torch.zeros(2, H, W))
    assert valid.tolist() == [[field == "area" for field in GEOMETRY_FIELDS]] * 2
    assert torch.equal(values, torch.zeros_like(values))


def test_all_ones() -> None:
    values, valid = _measure_np(np.ones((H, W), dtype=bool))
    assert valid[: ATTRIBUTE_SLICES["area"].stop].all()
    assert values[:5].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert values[GEOMETRY_FIELDS.index("solidity")] == 1.0


def test_batch_equals_single_calls() -> None:
    stack = torch.from_numpy(np.stack(list(SHAPES.values())))
    values, valid = measure(stack)
    assert values.shape == (len(SHAPES), NUM_GEOMETRY) and values.dtype == torch.float32
    assert valid.shape == values.shape and valid.dtype == torch.bool
    for i, m in enumerate(stack):
        v, ok = measure(m[None])
        torch.testing.assert_close(values[i], v[0], rtol=0, atol=1e-6)
        assert torch.equal(valid[i], ok[0])


def test_input_types_and_threshold() -> None:
    m = torch.from_numpy(SHAPES["ellipse_rot_0.4"])[None]
    reference, reference_valid = measure(m)
    for mask, threshold in (
        (m.float(), 0.5),
        (m.double(), 0.5),
        (m.half(), 0.5),
        (0.3 + 0.4 * m.float(), 0.6),
    ):
        values, valid = measure(mask, threshold)
        assert torch.equal(values, reference) and torch.equal(valid, reference_valid)


def test_soft_measures_equal_hard_ones_on_binary_masks() -> None:
    stack = torch.from_numpy(np.stack(list(SHAPES.values()))).float()
    values, _ = measure(stack)
    torch.testing.assert_close(soft_area(stack), values[:, ATTRIBUTE_SLICES["area"]].squeeze(-1), rtol=0, atol=1e-7)
    torch.testing.assert_close(soft_centroid(stack), values[:, ATTRIBUTE_SLICES["centroid"]], rtol=0, atol=1e-5)


def test_soft_measures_of_empty_and_low_precision_maps() -> None:
    zeros = torch.zeros(3, H, W, dtype=torch.float16)
    assert torch.isfinite(soft_centroid(zeros)).all()
    assert soft_area(zeros).tolist() == [0.0, 0.0, 0.0]
    ones = torch.ones(1, 384, 384, dtype=torch.float16)  # coordinate sums overflow float16
    torch.testing.assert_close(soft_centroid(ones), torch.tensor([[0.5, 0.5]]), rtol=0, atol=1e-5)


def test_reference_centroid_convention_drops_the_half_pixel() -> None:
    stack = torch.from_numpy(np.stack(list(SHAPES.values()))).float()
    ours, theirs = soft_centroid(stack), soft_centroid(stack, pixel_centres=False)
    torch.testing.assert_close(ours - theirs, torch.tensor([[0.5 / W, 0.5 / H]]).expand_as(ours), rtol=0, atol=1e-6)


# Rotations of one ellipse whose regionprops orientation spans (-pi/2, pi/2) without touching its ends.
ANGLES = [-1.45, -1.1, -0.7, -0.3, 0.0, 0.2, 0.6, 1.0, 1.3, 1.5]


@pytest.mark.parametrize("rotation", ANGLES)
def test_the_references_one_orientation_value_becomes_our_two_columns(rotation: float) -> None:
    """Read as o = θ/π + 1/2 with θ = regionprops' orientation, the reference's single value maps onto exactly the
    columns ``measure`` gives, and its flip rule o -> 1 - o onto the columns of the flipped mask."""
    mask = _ellipse(48, 56, 36, 11, rotation)
    theta = regionprops(mask.astype(np.uint8))[0].orientation
    o = torch.tensor([[theta / math.pi + 0.5]])
    columns = ATTRIBUTE_SLICES["orientation"]
    values, valid = measure(torch.from_numpy(mask)[None])
    assert valid[0, columns].all()
    torch.testing.assert_close(orientation_from_angle(o), values[:, columns], rtol=0, atol=1e-4)
    for flipped in (mask[:, ::-1], mask[::-1]):
        flipped = np.ascontiguousarray(flipped)
        flipped_theta = regionprops(flipped.astype(np.uint8))[0].orientation
        assert flipped_theta / math.pi + 0.5 == pytest.approx(1 - o.item(), abs=1e-6)
        flipped_values, _ = measure(torch.from_numpy(flipped)[None])
        torch.testing.assert_close(orientation_from_angle(1 - o), flipped_values[:, columns], rtol=0, atol=1e-4)


def test_orientation_from_angle_is_continuous_across_the_wrap() -> None:
    """o = 0 and o = 1 are the same (vertical) axis, as θ = -π/2 and π/2 are."""
    ends = orientation_from_angle(torch.tensor([[0.0], [1.0], [1e-6], [1 - 1e-6]]))
    torch.testing.assert_close(ends, torch.tensor([[0.5, 0.0]]).expand(4, 2), rtol=0, atol=1e-5)


def _random_masks(count: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    masks = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            m = _ellipse(*rng.uniform(10, 90, 2), *rng.uniform(2, 35, 2), rng.uniform(-math.pi, math.pi))
        elif kind == 1:
            m = _polygon([tuple(p) for p in rng.uniform(0, 1, (5, 2)) * [H, W]])
        else:
            m = rng.random((H, W)) < rng.uniform(0.002, 0.3)
        masks.append(m)
    return torch.from_numpy(np.stack(masks))


@pytest.mark.parametrize("horizontal", [True, False])
def test_flip_identities(horizontal: bool) -> None:
    masks = torch.cat([_random_masks(18, seed=3), torch.zeros(1, H, W, dtype=torch.bool)])
    values, valid = measure(masks)
    flipped_values, flipped_valid = measure(masks.flip(-1 if horizontal else -2))
    assert torch.equal(flipped_valid, valid)
    torch.testing.assert_close(flip_geometry(values, horizontal, valid), flipped_values, rtol=0, atol=1e-5)
    # Without valid the map is the same on every valid entry, and it is an involution.
    torch.testing.assert_close(flip_geometry(values, horizontal)[valid], flipped_values[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(flip_geometry(flip_geometry(values, horizontal), horizontal), values, rtol=0, atol=1e-7)


def test_flip_geometry_keeps_leading_dims() -> None:
    values = torch.rand(3, 4, NUM_GEOMETRY)
    flipped = flip_geometry(values, horizontal=False)
    assert flipped.shape == values.shape
    torch.testing.assert_close(flipped[..., 1], 1 - values[..., 3])
    torch.testing.assert_close(flipped[..., 9], 1 - values[..., 9])


def _edge_cases() -> torch.Tensor:
    corners = torch.zeros(1, H, W)
    corners[0, 0, 0] = corners[0, -1, -1] = corners[0, 0, -1] = corners[0, -1, 0] = 1
    checker = ((torch.arange(H)[:, None] + torch.arange(W)[None, :]) % 2).float()[None]
    return torch.cat(
        [
            torch.zeros(1, H, W),
            torch.ones(1, H, W),
            torch.rand(4, H, W, generator=torch.Generator().manual_seed(0)),
            corners,
            checker,
            torch.from_numpy(np.stack([SHAPES[k] for k in ("single_pixel", "row", "column", "two_pixels")])).float(),
        ]
    )


def test_values_finite_and_in_unit_interval() -> None:
    values, _ = measure(_edge_cases())
    assert torch.isfinite(values).all()
    assert (values >= 0).all() and (values <= 1).all()


def test_autocast_does_not_change_values() -> None:
    masks = torch.cat([_random_masks(6, seed=5).float(), _edge_cases()])
    expected = measure(masks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, valid = measure(masks)
    assert values.dtype == torch.float32
    assert torch.equal(values, expected[0]) and torch.equal(valid, expected[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    masks = torch.cat([_random_masks(6, seed=5).float(), _edge_cases()])
    expected, expected_valid = measure(masks)
    values, valid = measure(masks.cuda())
    assert values.device.type == "cuda"
    torch.testing.assert_close(values.cpu(), expected, rtol=0, atol=1e-5)
    assert torch.equal(valid.cpu(), expected_valid)
    with torch.autocast("cuda", dtype=torch.float16):
        values, valid = measure(masks.cuda())
    torch.testing.assert_close(values.cpu(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(soft_centroid(masks.cuda().half()).cpu(), soft_centroid(masks), rtol=0, atol=1e-5)


class _Measure(torch.nn.Module):
    def forward(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return measure(mask)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_trace_generalises_over_batch() -> None:
    example = torch.rand(2, H, W)
    traced = torch.jit.trace(_Measure(), example, check_trace=False)
    inputs = torch.cat([_edge_cases()[:5], _random_masks(3, seed=11).float()])
    values, valid = traced(inputs)
    expected, expected_valid = measure(inputs)
    assert values.shape[0] == inputs.shape[0]
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-6)
    assert torch.equal(valid, expected_valid)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_onnx_export_matches_eager(dynamo: bool, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "geometry.onnx"
    example = torch.rand(2, 64, 80)
    shapes = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dynamo else {}
    axes = {} if dynamo else {"dynamic_axes": {name: {0: "batch"} for name in ("mask", "values", "valid")}}
    torch.onnx.export(
        _Measure().eval(),
        (example,),
        str(path),
        input_names=["mask"],
        output_names=["values", "valid"],
        opset_version=18,
        dynamo=dynamo,
        verbose=False,
        **shapes,
        **axes,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    masks = torch.zeros(5, 64, 80)
    masks[1] = 1
    masks[2, 10, 20] = 1
    masks[3] = torch.rand(64, 80, generator=torch.Generator().manual_seed(1))
    masks[4, 5:50, 10:70] = torch.from_numpy(_ellipse(22, 30, 20, 8, 0.6)[:45, :60]).float()
    values, valid = session.run(None, {"mask": masks.numpy()})
    expected, expected_valid = measure(masks)
    np.testing.assert_allclose(values, expected.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(valid, expected_valid.numpy())
