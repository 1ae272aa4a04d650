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

# The reference reads its image positions from a table of 24 rows and 24 columns: inputs up to 24 * 32 = 768 px.
REFERENCE_POSITION_TABLE = 24
CONSENSUS_RULES = ("relative", "reference")


@dataclass(frozen=True)
class Layout:
    """The structural choices where the reference code's network and ours differ, one flag each.

    ``C2PConfig.layout`` names one of ``LAYOUTS``; models.network.assemble hands each part its flags, so the
    parts stay ours and a reference checkpoint maps onto them name by name (models/reference.py).
    """

    qkv_bias: bool  # the attention's q/k/v projections have biases
    norm_context: bool  # an interaction layer LayerNorms the side it attends to (keys and values), not only queries
    split_positions: bool  # positions concat(row[D/2], col[D/2]) from a 24-table, not row[D] + col[D] over the grid
    reinject_bias: bool  # the 1x1 re-injection conv has a bias
    decoder_bias: bool  # the decoder's 3x3 convs have biases (before their BatchNorm)
    up_to_skip: bool  # an up-conv ends on the skip's channels (the last block: 256 -> 128, then 3x3 256 -> 64)
    mlp_norm: bool  # a LayerNorm after the first Linear of the kernel generators, SEM heads and SCFM
    scfm_widths_from_backbone: bool  # SCFM style C2 and content C5/2 wide, not token_dim/2 each
    style_eps: float  # SCFM style std = sqrt(var + eps); 0 keeps torch's std


LAYOUTS: dict[str, Layout] = {
    "c2p": Layout(
        qkv_bias=True,
        norm_context=True,
        split_positions=False,
        reinject_bias=True,
        decoder_bias=False,
        up_to_skip=False,
        mlp_norm=False,
        scfm_widths_from_backbone=False,
        style_eps=0.0,
    ),
    # Every choice the other way, as the reference's network.py makes it.
    "reference": Layout(
        qkv_bias=False,
        norm_context=False,
        split_positions=True,
        reinject_bias=False,
        decoder_bias=True,
        up_to_skip=True,
        mlp_norm=True,
        scfm_widths_from_backbone=True,
        style_eps=1e-6,
    ),
}


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
    # How the parts are laid out: "c2p" is ours; "reference" is Yundi218/Concept-to-Pixel's network.py (``Layout``),
    # so that its checkpoints load (``c2p import-reference``). The options below are the reference's other choices.
    layout: str = "c2p"
    # 2: orientation as (sin 2θ, cos 2θ), as trained here; 1: the reference's single value o = θ/π + 1/2, turned into
    # the same two columns inside the network (models.geometry.orientation_from_angle), so every model outputs 14.
    orientation_values: int = 2
    align_corners: bool = False  # bilinear upsampling of the stride-4 logits to the input (reference: True)
    head_heads: int | None = None  # heads of the TGDH cross-attentions; None: num_heads (reference: 4)
    # The consensus rule (models.consensus): "relative" weights exp(-5(u - min u)) and pixel-centre centroids;
    # "reference" the reference's exp(-5u) and centroids sum(x p) / sum(p) / W with x = 0..W-1.
    consensus: str = "relative"
    # The TGDH's pooled GroupNorm from per-channel moments (models.network.head.pooled_group_norm): the same numbers,
    # but exported exactly where the stride-4 map is large (base at 384: ONNX Runtime drifts 2e-4 otherwise). Off by
    # default so that the shipped weights give the outputs they were evaluated with, bit for bit.
    pooled_norm: bool = False

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
        self._check_reference_options()

    def _check_reference_options(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.consensus not in CONSENSUS_RULES:
            raise ValueError(f"consensus must be one of {', '.join(CONSENSUS_RULES)}, got {self.consensus!r}")
        if self.orientation_values not in (1, 2):
            raise ValueError(f"orientation_values must be 1 (an angle) or 2 (sin, cos), got {self.orientation_values}")
        if self.head_heads is not None and (self.head_heads < 1 or self.dim % self.head_heads):
            raise ValueError(f"head_heads must be positive and divide dim {self.dim}, got {self.head_heads}")
        if LAYOUTS[self.layout].split_positions:
            if self.dim % 2:
                raise ValueError(f"the {self.layout} layout splits positions into rows and columns: dim must be even")
            if self.grid_size > REFERENCE_POSITION_TABLE:
                table = REFERENCE_POSITION_TABLE
                raise ValueError(
                    f"the {self.layout} layout has positions for {table} x {table} image tokens: input_size must be "
                    f"at most {32 * table}, got {self.input_size}"
                )

    @property
    def parts(self) -> Layout:
        """The structural flags of this config's layout."""
        return LAYOUTS[self.layout]

    @property
    def tgdh_heads(self) -> int:
        """Heads of the dynamic head's two cross-attentions."""
        return self.num_heads if self.head_heads is None else self.head_heads

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
        # The reference code's own network (network.py: base only, its channels are hard-coded), the target of
        # ``c2p import-reference``: 768-d text heads, one orientation value, 4-head TGDH, its consensus.
        C2PConfig(
            "c2p-reference-base-384",
            "convnextv2_base",
            384,
            text_dim=768,
            geo_token_noise=0.01,
            layout="reference",
            orientation_values=1,
            align_corners=True,
            head_heads=4,
            consensus="reference",
            pooled_norm=True,
        ),
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
