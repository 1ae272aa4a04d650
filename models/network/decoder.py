"""U-Net decoder from the re-injected E5 back to a 64-channel map at stride 4 (D2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class UpBlock(nn.Module):
    """2x2 transposed conv to ``up_channels`` (default: the block's output), concat the skip, 3x3 conv, BN, ReLU."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        up_channels: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        up_channels = out_channels if up_channels is None else up_channels
        self.up = nn.ConvTranspose2d(in_channels, up_channels, kernel_size=2, stride=2)
        self.fuse = nn.Sequential(
            nn.Conv2d(up_channels + skip_channels, out_channels, kernel_size=3, padding=1, bias=bias),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


class UNetDecoder(nn.Module):
    """Channels come from the backbone's feature info; the last block ends on ``out_channels``.

    ``up_to_skip`` is the reference layout's: each up-conv ends on its skip's channels, so the last block goes
    E3 -> 128 channels (E2's) and only its 3x3 conv narrows to 64; ``bias`` gives those convs biases as there.
    """

    def __init__(
        self, channels: Sequence[int], out_channels: int, up_to_skip: bool = False, bias: bool = False
    ) -> None:
        super().__init__()
        c2, c3, c4, c5 = channels
        self.blocks = nn.ModuleList(
            UpBlock(deep, skip, out, skip if up_to_skip else None, bias)
            for deep, skip, out in ((c5, c4, c4), (c4, c3, c3), (c3, c2, out_channels))
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        e2, e3, e4, e5 = features
        x = e5
        for block, skip in zip(self.blocks, (e4, e3, e2), strict=True):
            x = block(x, skip)
        return x
