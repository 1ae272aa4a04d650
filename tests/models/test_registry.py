from __future__ import annotations

import pytest

from models.registry import DEFAULT_VARIANT, KERNEL_SIZE, VARIANTS, C2PConfig, get_config


def test_reference_config_matches_the_paper() -> None:
    base = VARIANTS["c2p-base-384"]
    assert (base.backbone, base.input_size, base.dim, base.kernel_size) == ("convnextv2_base", 384, 584, 584)
    assert (base.token_dim, base.num_heads, base.num_layers) == (768, 8, 3)
    assert KERNEL_SIZE == 64 * 8 + 8 * 8 + 8 == 584


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
