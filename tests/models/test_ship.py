from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import read_card, resolve, save_checkpoint
from models.registry import build_c2p, get_config
from models.ship import ship
from tests.conftest import seeded_network


def test_ship_writes_half_precision_weights_that_load_strictly(tmp_path: Path) -> None:
    network = seeded_network()
    checkpoint = save_checkpoint(network, tmp_path / "run" / "final.safetensors", get_config("c2p-test-64"))
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"summary": {"in_domain_mean_dice": 0.5}}))
    weights = ship(checkpoint, evaluation, {"command": "c2p train ..."}, tmp_path / "weights")
    assert weights.name == "c2p-test-64.safetensors"
    card = read_card(weights)  # checks the recorded sha256
    assert card["dtype"] == "float16" and card["evaluation"]["summary"]["in_domain_mean_dice"] == 0.5
    loaded = build_c2p("c2p-test-64", checkpoint=weights)
    for (name, a), b in zip(network.state_dict().items(), loaded.state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-3, msg=name)


def test_shipped_default_model_is_present_and_loads() -> None:
    """The weights the service ships by default: under 25 MB, card intact, strict load."""
    from models.registry import DEFAULT_VARIANT

    config, weights, card = resolve(DEFAULT_VARIANT)
    if weights is None:
        pytest.skip(f"no weights shipped for {DEFAULT_VARIANT} yet")
    assert weights.stat().st_size <= 25 * 1024 * 1024
    assert card["evaluation"]["summary"]["in_domain_mean_dice"] is not None
    build_c2p(config, checkpoint=weights)
