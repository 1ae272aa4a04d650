"""TGDH (token-guided dynamic head): per-image fg/bg kernels from the concept tokens, applied batched.

Each kernel is 584 numbers, three bias-free 1x1 convs 64->8->8->1 with ReLU between (CondInst-like).
Applying a different kernel per image is a batched matrix product: three bmm calls for the whole
batch, fg and bg together, never a Python loop over samples.
"""

from __future__ import annotations

import torch
from torch import nn

from models.geometry import orientation_from_angle
from models.network.attention import Attention
from models.network.layers import mlp


def kernel_mlp(dim: int, kernel_size: int, norm: bool = False) -> nn.Sequential:
    """z = [geo, sem, g] (3D) -> 2D -> one kernel; the reference layout adds a LayerNorm (``norm``)."""
    return mlp(3 * dim, 2 * dim, kernel_size, norm)


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


def pooled_group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm(x).mean(dim=(2, 3))`` for a one-group GroupNorm, [B, C, H, W] -> [B, C], from moments.

    The same numbers to float rounding, but each reduction runs over one axis at a time (H*W, then C) and the
    normalised map is never made. ONNX Runtime's float32 reductions over the whole map at once drift from
    PyTorch's by about 2e-4 relative on the base model at 384 px (584 x 96 x 96 values), past the export's
    parity bound; reduced in two steps the gap is 1e-6.
    """
    channel_mean = x.mean(dim=(2, 3))  # [B, C]
    mean = channel_mean.mean(dim=1, keepdim=True)  # [B, 1]
    var = (x - mean[..., None, None]).square().mean(dim=(2, 3)).mean(dim=1, keepdim=True)
    return (channel_mean - mean) * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias


class DynamicHead(nn.Module):
    """g = pool(GroupNorm(1x1 conv D2 -> D)); geo/sem = CrossAttn(g, tokens); z = [geo, sem, g] -> kernels.

    The reference layout's attentions have no q/k/v bias (``qkv_bias``) and its kernel MLPs a LayerNorm (``norm``).
    ``pooled_norm`` computes g by ``pooled_group_norm``: the same g, exported exactly at any map size.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        num_heads: int,
        hidden: int,
        qkv_bias: bool = True,
        norm: bool = False,
        pooled_norm: bool = False,
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.pooled_norm = pooled_norm
        kernel_size = in_channels * hidden + hidden * hidden + hidden
        self.embed = nn.Sequential(nn.Conv2d(in_channels, dim, kernel_size=1), nn.GroupNorm(1, dim))
        self.geo_attn = Attention(dim, num_heads, qkv_bias)
        self.sem_attn = Attention(dim, num_heads, qkv_bias)
        self.fg = kernel_mlp(dim, kernel_size, norm)
        self.bg = kernel_mlp(dim, kernel_size, norm)

    def kernels(self, d2: torch.Tensor, geo_tokens: torch.Tensor, sem_tokens: torch.Tensor) -> torch.Tensor:
        """[B, 2, kernel_size]: the fg and the bg kernel of each image."""
        if self.pooled_norm:
            g = pooled_group_norm(self.embed[0](d2), self.embed[1]).unsqueeze(1)  # [B, 1, D]
        else:
            g = self.embed(d2).mean(dim=(2, 3)).unsqueeze(1)
        z = torch.cat([self.geo_attn(g, geo_tokens), self.sem_attn(g, sem_tokens), g], dim=-1)
        return torch.cat([self.fg(z), self.bg(z)], dim=1)

    def forward(self, d2: torch.Tensor, geo_tokens: torch.Tensor, sem_tokens: torch.Tensor) -> torch.Tensor:
        """fg and bg logits [B, 2, H/4, W/4]."""
        return apply_dynamic_kernels(d2, self.kernels(d2, geo_tokens, sem_tokens), self.hidden)


class GeoHeads(nn.Module):
    """One MLP per GEO token (D -> 256 -> width, LN, GELU, sigmoid): the 14 normalised geometry numbers.

    A reference model predicts orientation as one value o = θ/π + 1/2; ``angle_column`` says which output column
    that is, and it leaves as our two double-angle columns, so the serving graph sees 14 numbers from any model.
    """

    def __init__(self, dim: int, hidden: int, widths: tuple[int, ...], angle_column: int | None = None) -> None:
        super().__init__()
        self.angle_column = angle_column
        self.heads = nn.ModuleList(mlp(dim, hidden, width, norm=True) for width in widths)

    def forward(self, geo_tokens: torch.Tensor) -> torch.Tensor:
        outs = [head(geo_tokens[:, i]) for i, head in enumerate(self.heads)]
        values = torch.sigmoid(torch.cat(outs, dim=-1))
        if self.angle_column is None:
            return values
        i = self.angle_column
        return torch.cat([values[:, :i], orientation_from_angle(values[:, i : i + 1]), values[:, i + 1 :]], dim=-1)


class SemHeads(nn.Module):
    """One MLP per SEM token (D -> D -> text width), pulled to sentence embeddings in training only.

    The reference layout puts a LayerNorm after the first Linear (``norm``).
    """

    def __init__(self, dim: int, text_dim: int, count: int, norm: bool = False) -> None:
        super().__init__()
        self.heads = nn.ModuleList(mlp(dim, dim, text_dim, norm) for _ in range(count))

    def forward(self, sem_tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(sem_tokens[:, i]) for i, head in enumerate(self.heads)], dim=1)
