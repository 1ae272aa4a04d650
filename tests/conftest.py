"""Shared fixtures: one seeded checkpoint of the tiny test variant, exported once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.checkpoint import save_checkpoint
from models.recipe import Recipe
from models.registry import build_c2p, get_config

TEST_VARIANT = "c2p-test-64"


def seeded_network(variant: str = TEST_VARIANT, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_c2p(variant).eval()


@pytest.fixture(scope="session")
def test_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As ``c2p train`` writes one: its card names the recipe it was trained by (today's, letterbox)."""
    network = seeded_network()
    card = {"note": "tests", "recipe": Recipe().to_card()}
    return save_checkpoint(
        network, tmp_path_factory.mktemp("ckpt") / "test.safetensors", get_config(TEST_VARIANT), card
    )


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, test_checkpoint: Path) -> Path:
    """An export folder made through the real CLI, as an operator would."""
    from service.cli import main

    out = tmp_path_factory.mktemp("export")
    assert main(["export", "--model", str(test_checkpoint), "--out", str(out)]) == 0
    return out
