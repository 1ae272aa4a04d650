from __future__ import annotations

import pytest

from models.registry import DEFAULT_VARIANT, KERNEL_SIZE, VARIANTS, C2PConfig, get_config


def test_reference_config_matches_the_paper() -> None:
    base = VARIANTS["c2p-base-384"]
    assert (base.backbone, base.input_size, base.dim, base.kernel_size) == ("convnextv2_base", 384, 584, 584)
    assert (base.token_dim, base.num_heads, base.num_layers) == (768, 8, 3)
    assert KERNEL_SIZE == 64 * 8 + 8 * 8 + 8 == 584


def test_reference_code_variant_has_the_reference_numbers() -> None:
    """network.py and train.py: 768-d text, one orientation value, 4-head TGDH, align_corners, its consensus."""
    config = VARIANTS["c2p-reference-base-384"]
    assert (config.backbone, config.input_size, config.dim, config.token_dim, config.text_dim) == (
        "convnextv2_base", 384, 584, 768, 768,
    )  # fmt: skip
    assert (config.layout, config.orientation_values, config.align_corners, config.consensus) == (
        "reference", 1, True, "reference",
    )  # fmt: skip
    assert (config.tgdh_heads, config.num_heads, config.num_layers, config.geo_token_noise) == (4, 8, 3, 0.01)
    assert not config.parts.qkv_bias and not config.parts.norm_context and config.parts.up_to_skip


def test_new_options_default_to_the_layout_the_shipped_weights_have() -> None:
    config = VARIANTS[DEFAULT_VARIANT]
    assert (config.layout, config.orientation_values, config.align_corners, config.consensus) == (
        "c2p", 2, False, "relative",
    )  # fmt: skip
    assert config.tgdh_heads == config.num_heads and not config.pooled_norm


def test_shipped_default_is_a_femto() -> None:
    assert DEFAULT_VARIANT in ("c2p-femto-256", "c2p-femto-192")
    assert VARIANTS[DEFAULT_VARIANT].backbone == "convnextv2_femto"


def test_unknown_variant_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="c2p-femto-256"):
        get_config("c2p-huge-9000")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"input_size": 100}, "multiple of 32"),
        ({"num_heads": 7}, "divisible"),
        ({"backbone": "resnet50"}, "ConvNeXt-V2"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"token_dim": 65}, "even"),
        ({"dim": 0}, "positive"),
        ({"layout": "timm"}, "layout must be one of c2p, reference"),
        ({"consensus": "mean"}, "consensus must be one of relative, reference"),
        ({"orientation_values": 3}, "orientation_values"),
        ({"head_heads": 3}, "head_heads must be positive and divide dim 64"),
        ({"layout": "reference", "input_size": 800}, "at most 768"),
    ],
)
def test_bad_values_raise(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_config("c2p-test-64", **overrides)


def test_config_round_trips_through_dict() -> None:
    config = get_config("c2p-femto-256")
    assert C2PConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        C2PConfig.from_dict({**config.to_dict(), "colour": "blue"})
