"""Multi-head cross-attention written out with matmuls, so it traces and exports the same everywhere."""

from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """Queries from one sequence, keys and values from another (no self-attention anywhere in C2P).

    ``qkv_bias=False`` is the reference layout's: its q/k/v projections have no bias (the output one has).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q(query)), self._heads(self.k(context)), self._heads(self.v(context))
        weights = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        b, _, n, _ = q.shape
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ratio: int = 4) -> None:
        super().__init__(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))
