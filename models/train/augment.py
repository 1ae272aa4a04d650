"""The reference augmentations, batched in torch, with geometry targets kept true to the new masks.

h/v flips p=0.5, rotation +-10 deg p=0.2, brightness/contrast x[0.8, 1.2] p=0.5, Gaussian noise
sigma 0.05 p=0.2 (C2P.md). Flips mirror the cached geometry exactly (``flip_geometry``). After a
rotation the reference marks geometry it cannot transform (the box) invalid; we measure the rotated
mask instead, which is exact for every attribute and costs a few milliseconds per batch.
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
    images = images + chosen * config.noise_sigma * noise
    return images.clamp(0, 1), masks, geometry, valid
