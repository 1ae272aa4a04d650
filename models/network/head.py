"""TGDH (token-guided dynamic head): per-image fg/bg kernels from the concept tokens, applied batched.

Each kernel is 584 numbers, three bias-free 1x1 convs 64->8->8->1 with ReLU between (CondInst-like).
Applying a different kernel per image is a batched matrix product: three bmm calls for the whole
batch, fg and bg together, never a Python loop over samples.
"""

from __future__ import annotations

import torch
from torch import nn

from models.network.attention import Attention


def kernel_mlp(dim: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, kernel_size))


def apply_dynamic_kernels(features: torch.Tensor, kernels: torch.Tensor, hidden: int) -> torch.Tensor:
    """features [B, C, H, W], kernels [B, K, C*h + h*h + h] -> logits [B, K, H, W].

    K kernels per image (fg and bg), each three bias-free 1x1 convs C->h->h->1 with ReLU between.
    """
    b, c, h, w = features.shape
    k = kernels.shape[1]
    n1, n2 = c * hidden, hidden * hidden
    w1 = kernels[..., :n1].reshape(b, k * hidden, c)
    w2 = kernels[..., n1 : n1 + n2].reshape(b * k, hidden, hidden)
    w3 = kernels[..., n1 + n2 :].reshape(b * k, 1, hidden)
    x = torch.relu(torch.bmm(w1, features.reshape(b, c, h * w)))  # [B, K*h, HW]
    x = torch.relu(torch.bmm(w2, x.reshape(b * k, hidden, h * w)))  # [B*K, h, HW]
    return torch.bmm(w3, x).reshape(b, k, h, w)


class DynamicHead(nn.Module):
    """g = pool(GroupNorm(1x1 conv D2 -> D)); geo/sem = CrossAttn(g, tokens); z = [geo, sem, g] -> kernels."""

    def __init__(self, in_channels: int, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        kernel_size = in_channels * hidden + hidden * hidden + hidden
        self.embed = nn.Sequential(nn.Conv2d(in_channels, dim, kernel_size=1), nn.GroupNorm(1, dim))
        self.geo_attn = Attention(dim, num_heads)
        self.sem_attn = Attention(dim, num_heads)
        self.fg = kernel_mlp(dim, kernel_size)
        self.bg = kernel_mlp(dim, kernel_size)

    def kernels(self, d2: torch.Tensor, geo_tokens: torch.Tensor, sem_tokens: torch.Tensor) -> torch.Tensor:
        """[B, 2, kernel_size]: the fg and the bg kernel of each image."""
        g = self.embed(d2).mean(dim=(2, 3)).unsqueeze(1)  # [B, 1, D]
        z = torch.cat([self.geo_attn(g, geo_tokens), self.sem_attn(g, sem_tokens), g], dim=-1)
        return torch.cat([self.fg(z), self.bg(z)], dim=1)

    def forward(self, d2: torch.Tensor, geo_tokens: torch.Tensor, sem_tokens: torch.Tensor) -> torch.Tensor:
        """fg and bg logits [B, 2, H/4, W/4]."""
        return apply_dynamic_kernels(d2, self.kernels(d2, geo_tokens, sem_tokens), self.hidden)


class GeoHeads(nn.Module):
    """One MLP per GEO token (D -> 256 -> width, LN, GELU, sigmoid): the 14 normalised geometry numbers."""

    def __init__(self, dim: int, hidden: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, width))
            for width in widths
        )

    def forward(self, geo_tokens: torch.Tensor) -> torch.Tensor:
        outs = [head(geo_tokens[:, i]) for i, head in enumerate(self.heads)]
        return torch.sigmoid(torch.cat(outs, dim=-1))


class SemHeads(nn.Module):
    """One MLP per SEM token (D -> D -> text width), pulled to sentence embeddings in training only."""

    def __init__(self, dim: int, text_dim: int, count: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, text_dim)) for _ in range(count)
        )

    def forward(self, sem_tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(sem_tokens[:, i]) for i, head in enumerate(self.heads)], dim=1)
