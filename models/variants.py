"""C2P variants: the config of one network (a few numbers each, timm's habit) and the variants registered by name.

Torch-free and importing nothing of the project, so that everything that only needs a variant's numbers (the
checkpoint cards, the network's parts, the service's default model) takes them from here without pulling in the
network or the checkpoint code, and no import cycle can form through the config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# One dynamic kernel is three bias-free 1x1 convs 64->8->8->1: 64*8 + 8*8 + 8 = 584 numbers. In the
# reference the token width D equals the kernel size (C2P.md); smaller variants narrow D, and their TGDH
# MLPs (3D -> 2D -> kernel) still end on a whole kernel, so the dynamic head is the same everywhere.
DECODER_CHANNELS = 64
KERNEL_HIDDEN = 8
KERNEL_SIZE = DECODER_CHANNELS * KERNEL_HIDDEN + KERNEL_HIDDEN * KERNEL_HIDDEN + KERNEL_HIDDEN


@dataclass(frozen=True)
class C2PConfig:
    """Everything that changes between C2P variants; the modules take their numbers from here."""

    name: str
    backbone: str
    input_size: int
    dim: int = KERNEL_SIZE  # D, the width of tokens and attention
    token_dim: int = 768
    # Width of the sentence embeddings the SEM heads are pulled to. The paper's text encoder gave 768;
    # this project embeds offline with all-MiniLM-L6-v2, which gives 384.
    text_dim: int = 384
    num_heads: int = 8
    num_layers: int = 3
    num_geo_tokens: int = 9
    num_sem_tokens: int = 9
    decoder_channels: int = DECODER_CHANNELS
    kernel_hidden: int = KERNEL_HIDDEN
    geo_hidden: int = 256
    geo_token_noise: float = 0.02
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    backbone_weights: str | None = None

    def __post_init__(self) -> None:
        if self.input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32 (the backbone's stride), got {self.input_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        for key in ("dim", "token_dim", "text_dim", "num_layers", "decoder_channels", "kernel_hidden", "geo_hidden"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.token_dim % 2:
            raise ValueError(f"token_dim must be even (SCFM splits it into style and content), got {self.token_dim}")
        if not self.backbone.startswith("convnextv2_"):
            raise ValueError(f"backbone must be a timm ConvNeXt-V2 (convnextv2_*), got {self.backbone!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std positive")

    @property
    def kernel_size(self) -> int:
        """Numbers in one dynamic kernel: bias-free 1x1 convs C->h->h->1."""
        return self.decoder_channels * self.kernel_hidden + self.kernel_hidden**2 + self.kernel_hidden

    @property
    def grid_size(self) -> int:
        """Side of the E5 token grid (stride 32)."""
        return self.input_size // 32

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> C2PConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown C2P config keys: {', '.join(unknown)}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


VARIANTS: dict[str, C2PConfig] = {
    config.name: config
    for config in (
        # The reference configuration of the paper's code.
        C2PConfig("c2p-base-384", "convnextv2_base", 384),
        C2PConfig("c2p-tiny-256", "convnextv2_tiny", 256, dim=256, token_dim=512),
        C2PConfig("c2p-nano-256", "convnextv2_nano", 256, dim=192, token_dim=384),
        # The variant the service ships: small enough to train on a CPU and to fit a 25 MB checkpoint.
        C2PConfig("c2p-femto-256", "convnextv2_femto", 256, dim=128, token_dim=256),
        C2PConfig("c2p-femto-192", "convnextv2_femto", 192, dim=128, token_dim=256),
        # For tests only: the same structure at a size CI runs in milliseconds.
        C2PConfig("c2p-test-64", "convnextv2_atto", 64, dim=64, token_dim=64, num_heads=4, geo_hidden=64),
    )
}

# The variant whose weights ship in models/weights/: femto trained at 192 px, twice the images per second
# of 256 px on a CPU, so more epochs in the hours available (its card says so).
DEFAULT_VARIANT = "c2p-femto-192"


def get_config(name: str, **overrides: Any) -> C2PConfig:
    """The config of a registered variant, with field overrides (a new name is kept if given)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown C2P variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
    if not overrides:
        return VARIANTS[name]
    return C2PConfig.from_dict({**VARIANTS[name].to_dict(), **overrides})
