"""The foreign generator is evaluation only: other code, held-out anatomy, never imported by training."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np

from models.data.synth import mri
from models.evaluate import foreign

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


def test_no_training_code_or_config_reaches_the_foreign_generator() -> None:
    training = [*(ROOT / "models" / "train").glob("*.py"), *(ROOT / "models" / "data").rglob("*.py")]
    for path in training:
        assert not any("foreign" in name for name in _imports(path)), f"{path} imports the foreign generator"
    for config in (ROOT / "models" / "configs").glob("*.toml"):
        assert "foreign" not in config.read_text(), f"{config} names foreign data"


def test_the_foreign_generator_shares_no_code_with_the_training_generator() -> None:
    names = _imports(Path(foreign.__file__))
    assert not any(n.startswith(("models.data", "models.train")) for n in names), names


def test_it_draws_from_the_slices_training_holds_out() -> None:
    assert foreign.HELD_OUT == mri.MNI_HELD_OUT
    for seed in range(12):
        _, _, meta = foreign.foreign_brain(np.random.default_rng(seed), 64, healthy=False)
        assert any(a <= meta["slice_index"] < b for a, b in mri.MNI_HELD_OUT[meta["plane"]])


def test_it_writes_one_dataset_per_family(tmp_path: Path) -> None:
    folders = foreign.write_foreign(tmp_path, n=3, size=64)
    splits = {}
    for folder in folders:
        meta = json.loads((folder / "dataset.json").read_text())["c2p"]
        splits[meta["task"]] = meta["split"]
        assert len(list((folder / "imagesTs").glob("*.png"))) == 3
    assert splits == {name: spec["split"] for name, spec in foreign.FAMILIES.items()}
    healthy = json.loads((tmp_path / "Dataset311_HealthyBrain" / "c2p_cases.json").read_text())
    assert all(case["empty"] for case in healthy)
