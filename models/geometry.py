"""The 9 C2P geometric attributes of binary masks, as pure tensor functions.

One implementation serves three callers that must never disagree: the training targets of the GEO
tokens, the consensus step inside the exported graph, and the reliability report. Hence everything is
batched tensor arithmetic with no data-dependent Python control flow (it traces, and exports to ONNX
with either exporter), and the numbers are defined by ``skimage.measure.regionprops`` of the whole
mask taken as one region, which the tests check.

All 14 values are normalised to [0, 1] so that a sigmoid head can predict them. Centroids use pixel
centres ((i + 0.5) / size) and orientation is encoded by the double angle, so that a flip is an exact
affine map of the values (``flip_geometry``) and an augmented training target never has to be
re-measured.

Float32 is exact where it matters: the convex hull is computed on integer (doubled) coordinates whose
products stay below 2**24 for masks up to about 1400 x 1400 pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_SLICES",
    "GEOMETRY_FIELDS",
    "ISOTROPY_LIMIT",
    "NUM_GEOMETRY",
    "flip_geometry",
    "measure",
    "orientation_from_angle",
    "soft_area",
    "soft_centroid",
]

from models.attributes import ATTRIBUTE_SLICES, ATTRIBUTES, GEOMETRY_FIELDS, NUM_GEOMETRY

# Below this anisotropy (l1 - l2) / (l1 + l2) the principal axis is decided by pixel noise, so the
# orientation is reported invalid rather than as an arbitrary angle.
ISOTROPY_LIMIT = 0.05

# skimage.measure.perimeter(neighborhood=4): each border pixel gets the code 10 * (diagonal border
# neighbours) + 2 * (edge border neighbours) + 1, and each code a length. Module constants (not
# torch.tensor calls in the functions) so that tracing records no tensor literal and warns of none.
_CROSS = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
_PERIMETER_CODE = torch.tensor([[10.0, 2.0, 10.0], [2.0, 1.0, 2.0], [10.0, 2.0, 10.0]]).view(1, 1, 3, 3)
_PERIMETER_LENGTHS = torch.zeros(50)
_PERIMETER_LENGTHS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_LENGTHS[[21, 33]] = math.sqrt(2.0)
_PERIMETER_LENGTHS[[13, 23]] = (1.0 + math.sqrt(2.0)) / 2.0
# Which condition makes each of the 14 columns defined: 0 always, 1 a non-empty mask, 2 principal axes
# (>= 2 pixels), 3 a clear principal direction (anisotropy >= ISOTROPY_LIMIT).
_CONDITION = {"area": 0, "aspect_ratio": 2, "eccentricity": 2, "orientation": 3}
_VALIDITY_CONDITION = torch.tensor([_CONDITION.get(name, 1) for name, width in ATTRIBUTES for _ in range(width)])
_BIG = 1.0e30  # a finite "infinity": the masked reductions below must never produce inf or NaN
_ABSENT = 2.0**26  # abscissa of absent hull candidates, beyond any (doubled) image width


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Half-precision sums of coordinates overflow (65504), so reduced-precision inputs are promoted."""
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def soft_area(prob: Tensor) -> Tensor:
    """[N, H, W] probabilities -> [N] expected area fraction; differentiable, used by the consensus."""
    return prob.to(_compute_dtype(prob)).mean(dim=(-2, -1))


def soft_centroid(prob: Tensor, eps: float = 1e-6, pixel_centres: bool = True) -> Tensor:
    """[N, H, W] probabilities -> [N, 2] (cx, cy), probability-weighted, normalised like ``measure``.

    eps keeps an all-zero map finite (its centroid is then the first pixel centre, never NaN).
    ``pixel_centres=False`` is the reference consensus's convention: sum(x p) / (sum p + eps) / W with
    x = 0..W-1, half a pixel left of and above ours.
    """
    dtype = _compute_dtype(prob)
    p = prob.to(dtype)
    height, width = p.shape[-2], p.shape[-1]
    xs = torch.arange(width, device=p.device, dtype=dtype)
    ys = torch.arange(height, device=p.device, dtype=dtype)
    mass = p.sum(dim=(-2, -1)) + eps
    if not pixel_centres:
        return torch.stack(
            [(p.sum(dim=-2) * xs).sum(-1) / mass / width, (p.sum(dim=-1) * ys).sum(-1) / mass / height], -1
        )
    cx = ((p.sum(dim=-2) * xs).sum(-1) / mass + 0.5) / width
    cy = ((p.sum(dim=-1) * ys).sum(-1) / mass + 0.5) / height
    return torch.stack([cx, cy], dim=-1)


def orientation_from_angle(angle: Tensor) -> Tensor:
    """[..., 1] the reference's orientation value o in [0, 1] -> [..., 2] our (orientation_sin, orientation_cos).

    The reference predicts one number per mask and mirrors it as o -> 1 - o under either flip. Its targets are
    not in its code; o = θ/π + 1/2 with θ = ``regionprops(...).orientation`` in [-π/2, π/2] is the reading that
    its flip rule holds for (a mirror maps θ -> -θ), and tests/models/test_geometry.py checks that this map
    then gives exactly ``measure``'s columns on rotated ellipses. With 2θ = 2πo - π:
    ((sin 2θ + 1)/2, (cos 2θ + 1)/2) = ((1 - sin 2πo)/2, (1 - cos 2πo)/2), and o -> 1 - o is our flip of them.
    """
    turn = 2.0 * math.pi * angle
    return torch.cat([0.5 * (1.0 - torch.sin(turn)), 0.5 * (1.0 - torch.cos(turn))], dim=-1)


def _perimeter(m: Tensor) -> Tensor:
    """[N, H, W] float 0/1 -> [N] perimeter in pixels, exactly ``skimage.measure.perimeter(m, 4)``.

    Two 3x3 convolutions of 0/1 images give small integer sums; they are rounded before use because a
    backend may convolve by Winograd or in half precision under autocast, which is inexact but never
    off by 1/2. The code -> length lookup is a gather into a 50-entry table.
    """
    x = m.unsqueeze(1)
    neighbours = F.conv2d(x, _CROSS.to(device=m.device, dtype=x.dtype), padding=1)
    interior = (neighbours > 4.5).to(x.dtype)  # erosion by a cross, zero outside the image
    border = x - interior
    code = F.conv2d(border, _PERIMETER_CODE.to(device=m.device, dtype=x.dtype), padding=1)
    lengths = _PERIMETER_LENGTHS.to(device=m.device, dtype=m.dtype)[code.squeeze(1).round().to(torch.int64)]
    return lengths.sum(dim=(-2, -1))


def _lower_hull_at_rows(f: Tensor, present: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Lower convex envelope of points (j, f[j]) evaluated at the odd levels j = 1, 3, ..., M - 2.

    f [..., M] holds integer-valued abscissae at M equally spaced levels; absent levels are ignored. A
    point is a vertex of the envelope iff the steepest chord arriving at it is no steeper than the
    shallowest chord leaving it (O(M^2), no sorting, no data-dependent shapes); chords are compared
    after one correctly rounded division each, so distinct slopes never swap order. The envelope at a
    level is the chord between the nearest vertices on either side. Returns (num, den, inside): the
    value is num / den, a fraction of exact integers that callers can round without float error;
    inside is False where the level lies outside the envelope's span.
    """
    levels = f.shape[-1]
    position = torch.arange(levels, device=f.device, dtype=f.dtype)
    gap = position - position.unsqueeze(-1)  # [a, b] = b - a
    forward = gap > 0
    # An absent point far to the right makes every chord into it steep and every chord out of it
    # shallow, so it never bounds a present point and needs no pair mask.
    far = torch.where(present, f, torch.full_like(f, _ABSENT))
    slope = (far[..., None, :] - far[..., :, None]) / torch.where(forward, gap, torch.ones_like(gap))
    steepest_in = torch.where(forward, slope, -_BIG).amax(dim=-2)  # over a < b, for each b
    shallowest_out = torch.where(forward, slope, _BIG).amin(dim=-1)  # over b > a, for each a
    vertex = present & (steepest_in <= shallowest_out)

    # Nearest vertex at or before / at or after each pixel-centre level (a masked max/min: ONNX has no
    # cummax, and a scan would need the size as a Python int, which tracing does not give).
    rows = torch.arange(1, levels, 2, device=f.device, dtype=f.dtype)
    at_or_before = position <= rows.unsqueeze(-1)  # [H, M]
    at_or_after = position >= rows.unsqueeze(-1)
    before = torch.where(at_or_before, torch.where(vertex, position, -1.0)[..., None, :], -1.0).amax(dim=-1)
    after = torch.where(at_or_after, torch.where(vertex, position, _ABSENT)[..., None, :], _ABSENT).amin(dim=-1)
    inside = (before >= 0) & (after < _ABSENT)
    before = torch.where(inside, before, torch.zeros_like(before))
    after = torch.where(inside, after, torch.zeros_like(after))
    f_before, f_after = far.gather(-1, before.long()), far.gather(-1, after.long())
    span = after - before
    num = f_before * span + (f_after - f_before) * (rows - before)
    single = span == 0
    num = torch.where(single, f_before, num)
    den = torch.where(single, torch.ones_like(span), span)
    return num, den, inside


def _convex_hull_pixels(rows_any: Tensor, first: Tensor, last: Tensor) -> Tensor:
    """[N] number of pixel centres inside the convex hull, as ``regionprops(...).area_convex``.

    skimage's hull is that of the pixels' edge midpoints (r +- 0.5, c) and (r, c +- 0.5), with pixel
    centres on its boundary counted in. Only the leftmost and rightmost pixel of each row can be hull
    points, so the hull is bounded by the lower envelope of the left points and the upper envelope of
    the right points, sampled on the levels y = -0.5, 0, 0.5, ..., H - 0.5. Coordinates are doubled
    (2y + 1, 2x + 1) to make every level and abscissa an integer.
    """

    # Half levels (between rows r - 1 and r, r = 0..H): top/bottom midpoints of the adjacent rows' ends.
    def extend(x: Tensor, fill: float) -> Tensor:
        edge = torch.full_like(x[..., :1], fill)
        return torch.cat([edge, x, edge], dim=-1)

    first_ext, last_ext = extend(first, _BIG), extend(last, -1.0)
    any_ext = extend(rows_any.to(first.dtype), 0.0) > 0  # full_like(bool) does not trace
    half_first = torch.minimum(first_ext[..., :-1], first_ext[..., 1:])
    half_last = torch.maximum(last_ext[..., :-1], last_ext[..., 1:])
    half_present = any_ext[..., :-1] | any_ext[..., 1:]

    def interleave(half: Tensor, whole: Tensor) -> Tensor:
        # [h0, w0, h1, w1, ..., w(H-1), hH]; sizes stay out of Python so that tracing keeps them symbolic.
        return torch.cat([torch.stack([half[..., :-1], whole], dim=-1).flatten(-2), half[..., -1:]], dim=-1)

    left = interleave(2.0 * half_first + 1.0, 2.0 * first)
    right = interleave(2.0 * half_last + 1.0, 2.0 * last + 2.0)
    present = interleave(half_present, rows_any)

    # Both sides in one call (upper envelope = -lower(-x)): half the nodes in an exported graph.
    num, den, inside = _lower_hull_at_rows(torch.stack([left, -right], dim=1), torch.stack([present, present], 1))
    num_l, num_r = num.unbind(dim=1)
    den_l, den_r = den.unbind(dim=1)
    inside_l, inside_r = inside.unbind(dim=1)
    # Pixel centre x has doubled abscissa 2x + 1; count the integers x with left <= 2x + 1 <= right.
    x_first = torch.ceil((num_l - den_l) / (2.0 * den_l))
    x_last = torch.floor((-num_r - den_r) / (2.0 * den_r))
    count = (x_last - x_first + 1.0).clamp(min=0.0)
    return torch.where(inside_l & inside_r, count, torch.zeros_like(count)).sum(-1)


def measure(mask: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """[N, H, W] masks (probabilities, 0/1 or bool) -> (values [N, 14] float32 in [0, 1], valid [N, 14]).

    The hard mask is ``mask >= threshold`` and all its pixels form one region, whatever the number of
    components. Undefined values (empty mask, axes of a single pixel, orientation of a nearly isotropic
    shape) are 0 and flagged invalid, so that losses and reports can leave them out.
    """
    hard = mask if mask.dtype == torch.bool else mask >= threshold
    m = hard.to(torch.float32)
    height, width = m.shape[-2], m.shape[-1]
    xs = torch.arange(width, device=m.device, dtype=torch.float32)
    ys = torch.arange(height, device=m.device, dtype=torch.float32)

    col_count, row_count = m.sum(dim=-2), m.sum(dim=-1)  # [N, W], [N, H]
    n = row_count.sum(dim=-1)
    nonempty = n > 0
    n_safe = n.clamp(min=1.0)
    cols_any, rows_any = col_count > 0, row_count > 0

    # Bounding box (regionprops bbox / size: the max is exclusive).
    xmin = torch.where(cols_any, xs, _BIG).amin(dim=-1)  # empty masks: huge, then zeroed as invalid
    xmax = torch.where(cols_any, xs, -1.0).amax(dim=-1) + 1.0
    ymin = torch.where(rows_any, ys, _BIG).amin(dim=-1)
    ymax = torch.where(rows_any, ys, -1.0).amax(dim=-1) + 1.0

    # Moments about the centroid, from mean-subtracted coordinates (no m20 - m10^2 cancellation).
    mean_x = (col_count * xs).sum(-1) / n_safe
    mean_y = (row_count * ys).sum(-1) / n_safe
    dx, dy = xs - mean_x.unsqueeze(-1), ys - mean_y.unsqueeze(-1)
    var_x = (col_count * dx * dx).sum(-1) / n_safe
    var_y = (row_count * dy * dy).sum(-1) / n_safe
    cov_xy = (m * dy.unsqueeze(-1) * dx.unsqueeze(-2)).sum(dim=(-2, -1)) / n_safe

    # Eigenvalues of the inertia tensor in closed form: l1,2 = (s +- r) / 2.
    trace = var_x + var_y
    diff = var_y - var_x
    spread = torch.sqrt(diff * diff + 4.0 * cov_xy * cov_xy)
    l1 = 0.5 * (trace + spread)
    l2 = (0.5 * (trace - spread)).clamp(min=0.0)
    has_axes = (n >= 2) & (l1 > 1e-6)
    l1_safe = torch.where(has_axes, l1, torch.ones_like(l1))
    aspect = torch.sqrt(l2 / l1_safe)
    eccentricity = torch.sqrt((spread / l1_safe).clamp(0.0, 1.0))  # 1 - l2/l1 without cancellation
    anisotropic = has_axes & (spread > ISOTROPY_LIMIT * trace)
    # regionprops: theta = 0.5 * atan2(2 cov_rc, var_r - var_c); encode 2*theta, continuous modulo pi.
    spread_safe = torch.where(anisotropic, spread, torch.ones_like(spread))
    orientation_sin = 0.5 * (2.0 * cov_xy / spread_safe + 1.0)
    orientation_cos = 0.5 * (diff / spread_safe + 1.0)

    perimeter_px = _perimeter(m)
    perimeter = perimeter_px / (2.0 * (height + width))
    compactness = 4.0 * math.pi * n / (perimeter_px * perimeter_px).clamp(min=1e-12)

    first = torch.where(hard, xs, _BIG).amin(dim=-1)  # [N, H] first/last column of each row
    last = torch.where(hard, xs, -1.0).amax(dim=-1)
    hull = _convex_hull_pixels(rows_any, first, last)
    solidity = n / hull.clamp(min=1.0)

    values = torch.stack(
        [
            xmin / width,
            ymin / height,
            xmax / width,
            ymax / height,
            n / (height * width),
            perimeter,
            aspect,
            compactness,
            (mean_x + 0.5) / width,
            (mean_y + 0.5) / height,
            eccentricity,
            orientation_sin,
            orientation_cos,
            solidity,
        ],
        dim=-1,
    )
    conditions = torch.stack([torch.ones_like(nonempty), nonempty, has_axes, anisotropic], dim=-1)
    valid = conditions[..., _VALIDITY_CONDITION.to(conditions.device)]
    values = torch.where(valid, values.clamp(0.0, 1.0), torch.zeros_like(values))
    return values, valid


def flip_geometry(values: Tensor, horizontal: bool, valid: Tensor | None = None) -> Tensor:
    """[..., 14] values of a mask -> values of the mask mirrored left-right (True) or up-down (False).

    Exact, so augmented training targets need not be re-measured; an involution. A mirror maps
    theta -> -theta, i.e. sin(2 theta) -> -sin(2 theta), on either axis. Invalid entries (which
    ``measure`` sets to 0) would be mapped like valid ones; pass ``valid`` (flip-invariant) to keep
    them at 0 so that ``flip_geometry(measure(m)) == measure(flip(m))`` holds everywhere.
    """
    cols = list(values.unbind(dim=-1))
    lo, hi, centre = (0, 2, 8) if horizontal else (1, 3, 9)
    cols[lo], cols[hi] = 1.0 - cols[hi], 1.0 - cols[lo]
    cols[centre] = 1.0 - cols[centre]
    cols[11] = 1.0 - cols[11]
    flipped = torch.stack(cols, dim=-1)
    if valid is not None:
        flipped = torch.where(valid, flipped, torch.zeros_like(flipped))
    return flipped
