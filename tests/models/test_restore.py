"""The serving graph shipped without its weights (models.export.strip) and made whole again (models.restore)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file, save_file

from models.export import probe_batch
from models.export.strip import strip_weights
from models.files import CARD_FILE, ONNX_FILE, WEIGHTS_DATA_FILE, sha256_file
from models.restore import RestoreError, restore_export, shipped_variant
from service.errors import ArtifactInvalid
from service.worker.engine.artifact import open_artifact


def _run(folder: Path, example: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: example})


@pytest.fixture(scope="module")
def stripped(tmp_path_factory: pytest.TempPathFactory, exported: Path, test_checkpoint: Path) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("stripped") / "test.onnx"
    strip_weights(exported, test_checkpoint, out)
    return out, out.with_name("test.export.json")


def test_the_package_ships_the_default_models_graph_for_its_weights(tmp_path: Path) -> None:
    """The committed graph belongs to the committed weights: restoring it checks both digests, and it runs."""
    found = shipped_variant("c2p-femto-192")
    assert found is not None, "models/weights/c2p-femto-192.onnx + .export.json are missing: run c2p ship --graph-only"
    weights, graph, card = found
    folder = restore_export(weights, graph, card, tmp_path / "model")
    artifact = open_artifact(folder, "onnx")
    assert artifact.card["weights"]["sha256"] == sha256_file(weights)
    assert graph.stat().st_size < 25 * 1024 * 1024
    outputs = _run(folder, probe_batch(artifact.input_size).numpy())
    assert all(np.isfinite(o).all() for o in outputs)


def test_stripping_moves_the_weights_out_and_changes_no_output(
    stripped: tuple[Path, Path], exported: Path, test_checkpoint: Path, tmp_path: Path
) -> None:
    graph, card_file = stripped
    card = json.loads(card_file.read_text())
    assert card["restored_parity"] and all(gap == 0 for gap in card["restored_parity"].values())
    layout = card["weights_data"]
    full = (exported / ONNX_FILE).stat().st_size
    assert graph.stat().st_size + layout["bytes"] >= full * 0.95  # everything accounted for
    assert layout["bytes"] > 0.5 * full, "most of the graph's bytes are the checkpoint's tensors"
    folder = restore_export(test_checkpoint, graph, card_file, tmp_path / "restored")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CARD_FILE, ONNX_FILE, WEIGHTS_DATA_FILE])
    example = probe_batch(64, batch=3, seed=4).numpy()
    for ours, theirs in zip(_run(folder, example), _run(exported, example), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_other_weights_are_refused(stripped: tuple[Path, Path], test_checkpoint: Path, tmp_path: Path) -> None:
    graph, card = stripped
    tensors = load_file(str(test_checkpoint))
    key = next(k for k, v in tensors.items() if v.dtype == np.float32 and v.size > 1)
    tensors[key] = tensors[key] + np.float32(1e-3)
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other))
    with pytest.raises(RestoreError, match="other weights"):
        restore_export(other, graph, card, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_changed_graph_or_weights_file_is_refused(
    stripped: tuple[Path, Path], test_checkpoint: Path, tmp_path: Path
) -> None:
    graph, card = stripped
    edited = tmp_path / "edited.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    edited.write_bytes(bytes(data))
    with pytest.raises(RestoreError, match="does not match"):
        restore_export(test_checkpoint, edited, card, tmp_path / "y")
    folder = restore_export(test_checkpoint, graph, card, tmp_path / "z")
    with open(folder / WEIGHTS_DATA_FILE, "r+b") as handle:
        handle.seek(128)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactInvalid, match=WEIGHTS_DATA_FILE):
        open_artifact(folder, "onnx")
    (folder / WEIGHTS_DATA_FILE).unlink()
    with pytest.raises(Exception, match="missing"):
        open_artifact(folder, "onnx")
    shutil.rmtree(folder)
