"""The reference augmentations, batched in torch, with geometry targets kept true to the new masks.

h/v flips p=0.5, rotation +-10 deg p=0.2, brightness/contrast x[0.8, 1.2] p=0.5, Gaussian noise
sigma 0.05 p=0.2 (C2P.md). Flips mirror the cached geometry exactly (``flip_geometry``). After a
rotation the reference marks geometry it cannot transform (the box) invalid; we measure the rotated
mask instead, which is exact for every attribute and costs a few milliseconds per batch.

One of our own, last: **letterbox** (p=``letterbox_p``) shows the network what the recipe makes of a
non-square slice (models/recipe.py), since every generated image is square: a window of the square,
columns / rows between ``letterbox_aspect`` and its inverse, around the target, centred on black bands
at scale 1 (its longer side already spans the square, as the recipe resizes it). Exact zeros, as the
service's bands are, so it comes after the intensity changes; the new mask is measured again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.geometry import flip_geometry, measure


@dataclass(frozen=True)
class AugmentConfig:
    flip_p: float = 0.5
    rotate_p: float = 0.2
    rotate_degrees: float = 10.0
    intensity_p: float = 0.5
    intensity_range: tuple[float, float] = (0.8, 1.2)
    noise_p: float = 0.2
    noise_sigma: float = 0.05
    letterbox_p: float = 0.0
    letterbox_aspect: float = 0.5  # the narrowest window: its short side is this share of the square at least


def _chance(p: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def rotate(images: torch.Tensor, masks: torch.Tensor, degrees: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each sample about the image centre (zeros outside); masks stay binary."""
    theta = torch.deg2rad(degrees)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    matrix = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(matrix.to(images), list(images.shape), align_corners=False)
    rotated = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    rotated_masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return rotated, rotated_masks


def letterbox(
    images: torch.Tensor, masks: torch.Tensor, shares: torch.Tensor, wide: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's window (``shares`` of the square along its short axis, rows when ``wide``) centred on black.

    The window holds the target's centre, jittered by a quarter of the window, so a target is cut at times but
    never cropped away (its semantic target would then be wrong).
    """
    size = images.shape[-1]
    out_images, out_masks = torch.zeros_like(images), torch.zeros_like(masks)
    for i in range(images.shape[0]):
        length = max(1, round(float(shares[i]) * size))
        axis = -2 if wide[i] else -1
        found = masks[i, 0].nonzero()
        centre = float(found[:, axis + 2].float().mean()) if len(found) else size / 2
        jitter = (float(torch.rand(1, generator=generator)) - 0.5) * length / 2
        start = int(min(max(round(centre - length / 2 + jitter), 0), size - length))
        place = (size - length) // 2
        source, target = slice(start, start + length), slice(place, place + length)
        if wide[i]:
            out_images[i, :, target], out_masks[i, :, target] = images[i, :, source], masks[i, :, source]
        else:
            out_images[i, :, :, target], out_masks[i, :, :, target] = images[i, :, :, source], masks[i, :, :, source]
    return out_images, out_masks


def augment(
    images: torch.Tensor,
    masks: torch.Tensor,
    geometry: torch.Tensor,
    valid: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """images [B, 3, H, W] in [0, 1], masks [B, 1, H, W], geometry [B, 14], valid [B, 14] -> the same, augmented.

    Random draws come from ``generator`` (on the CPU), so a seeded run is repeatable on any device.
    """
    n = images.shape[0]
    images, masks, geometry, valid = images.clone(), masks.clone(), geometry.clone(), valid.clone()
    for dim, horizontal in ((-1, True), (-2, False)):
        chosen = _chance(config.flip_p, n, generator).to(images.device)
        if chosen.any():
            images[chosen] = images[chosen].flip(dim)
            masks[chosen] = masks[chosen].flip(dim)
            geometry[chosen] = flip_geometry(geometry[chosen], horizontal=horizontal, valid=valid[chosen])

    chosen = _chance(config.rotate_p, n, generator)
    if chosen.any():
        degrees = (torch.rand(int(chosen.sum()), generator=generator) * 2 - 1) * config.rotate_degrees
        index = chosen.nonzero().squeeze(1).to(images.device)
        rotated, rotated_masks = rotate(images[index], masks[index], degrees.to(images.device))
        images[index], masks[index] = rotated, rotated_masks
        geometry[index], valid[index] = measure(rotated_masks[:, 0])

    chosen = _chance(config.intensity_p, n, generator)
    low, high = config.intensity_range
    brightness = torch.where(chosen, low + (high - low) * torch.rand(n, generator=generator), torch.ones(n))
    contrast = torch.where(chosen, low + (high - low) * torch.rand(n, generator=generator), torch.ones(n))
    brightness, contrast = brightness.to(images).view(n, 1, 1, 1), contrast.to(images).view(n, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = ((images - mean) * contrast + mean) * brightness

    chosen = _chance(config.noise_p, n, generator).to(images).view(n, 1, 1, 1)
    noise = torch.randn(images.shape, generator=generator).to(images)
    images = (images + chosen * config.noise_sigma * noise).clamp(0, 1)

    chosen = _chance(config.letterbox_p, n, generator)
    if chosen.any():
        k = int(chosen.sum())
        shares = config.letterbox_aspect + (1 - config.letterbox_aspect) * torch.rand(k, generator=generator)
        wide = _chance(0.5, k, generator)
        index = chosen.nonzero().squeeze(1).to(images.device)
        boxed, boxed_masks = letterbox(images[index], masks[index], shares, wide, generator)
        images[index], masks[index] = boxed, boxed_masks
        geometry[index], valid[index] = measure(boxed_masks[:, 0])
    return images, masks, geometry, valid
