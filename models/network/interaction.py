"""Token-image interaction: 3 bidirectional cross-attention layers, then re-injection into E5."""

from __future__ import annotations

import torch
from torch import nn

from models.network.attention import Attention, FeedForward


class ImageTokens(nn.Module):
    """E5 flattened, projected to D, plus a learned row + column position embedding."""

    def __init__(self, channels: int, dim: int, grid: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(channels, dim), nn.LayerNorm(dim))
        self.row = nn.Parameter(torch.zeros(grid, 1, dim))
        self.col = nn.Parameter(torch.zeros(1, grid, dim))
        nn.init.trunc_normal_(self.row, std=0.02)
        nn.init.trunc_normal_(self.col, std=0.02)

    def forward(self, e5: torch.Tensor) -> torch.Tensor:
        tokens = self.project(e5.flatten(2).transpose(1, 2))
        return tokens + (self.row + self.col).flatten(0, 1)


class SplitImageTokens(nn.Module):
    """The reference layout's image tokens: the row embedding fills the first D/2 channels, the column one the rest.

    Both come from tables of ``table`` entries (24 in the reference) of which the E5 grid reads the first rows and
    columns, so the checkpoint keeps the whole table and any input up to 32 * table pixels has positions.
    """

    def __init__(self, channels: int, dim: int, table: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(channels, dim), nn.LayerNorm(dim))
        self.row = nn.Parameter(torch.zeros(table, dim // 2))
        self.col = nn.Parameter(torch.zeros(table, dim // 2))
        nn.init.normal_(self.row, std=0.02)
        nn.init.normal_(self.col, std=0.02)

    def forward(self, e5: torch.Tensor) -> torch.Tensor:
        h, w = e5.shape[-2:]
        rows = self.row[:h].unsqueeze(1).expand(-1, w, -1)
        cols = self.col[:w].unsqueeze(0).expand(h, -1, -1)
        return self.project(e5.flatten(2).transpose(1, 2)) + torch.cat([rows, cols], dim=-1).flatten(0, 1)


class BidirectionalLayer(nn.Module):
    """Pre-LN: tokens attend to the image, the image attends to the layer's input tokens; FFN after each.

    The image side reads the tokens as they entered the layer, so both directions see the same state.
    ``norm_context=False`` is the reference layout's: keys and values come from the other side un-normalised.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, norm_context: bool = True) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(dim)
        self.token_context_norm = nn.LayerNorm(dim) if norm_context else nn.Identity()
        self.token_attn = Attention(dim, num_heads, qkv_bias)
        self.token_ffn_norm = nn.LayerNorm(dim)
        self.token_ffn = FeedForward(dim)
        self.image_norm = nn.LayerNorm(dim)
        self.image_context_norm = nn.LayerNorm(dim) if norm_context else nn.Identity()
        self.image_attn = Attention(dim, num_heads, qkv_bias)
        self.image_ffn_norm = nn.LayerNorm(dim)
        self.image_ffn = FeedForward(dim)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new_tokens = tokens + self.token_attn(self.token_norm(tokens), self.token_context_norm(image))
        new_tokens = new_tokens + self.token_ffn(self.token_ffn_norm(new_tokens))
        new_image = image + self.image_attn(self.image_norm(image), self.image_context_norm(tokens))
        new_image = new_image + self.image_ffn(self.image_ffn_norm(new_image))
        return new_tokens, new_image


class Interaction(nn.Module):
    """Image tokens (given: ``ImageTokens`` or ``SplitImageTokens``), the layers, the 1x1 re-injection conv."""

    def __init__(
        self,
        image_tokens: ImageTokens | SplitImageTokens,
        e5_channels: int,
        dim: int,
        num_heads: int,
        num_layers: int,
        qkv_bias: bool = True,
        norm_context: bool = True,
        reinject_bias: bool = True,
    ) -> None:
        super().__init__()
        self.image_tokens = image_tokens
        self.layers = nn.ModuleList(
            BidirectionalLayer(dim, num_heads, qkv_bias, norm_context) for _ in range(num_layers)
        )
        self.reinject = nn.Conv2d(dim, e5_channels, kernel_size=1, bias=reinject_bias)

    def forward(self, tokens: torch.Tensor, e5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the updated concept tokens and the new E5 that replaces the backbone's."""
        image = self.image_tokens(e5)
        for layer in self.layers:
            tokens, image = layer(tokens, image)
        b, _, h, w = e5.shape
        return tokens, self.reinject(image.transpose(1, 2).reshape(b, -1, h, w))
