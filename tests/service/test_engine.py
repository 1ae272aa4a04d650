from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.export import probe_batch
from service.config import EngineSettings
from service.errors import ArtifactInvalid, ArtifactNotFound, InvalidTensor
from service.worker.engine import load_engine, warm_up

KINDS = ["onnx", "torchscript"]


@pytest.mark.parametrize("kind", KINDS)
def test_engine_runs_a_batch_and_names_its_outputs(exported: Path, kind: str) -> None:
    engine = load_engine(exported, EngineSettings(kind=kind, intra_op_threads=1, max_batch_size=4))
    assert engine.device == "cpu"
    images = probe_batch(64, 3).numpy()
    out = engine.run(images)
    assert list(out) == engine.artifact.output_names
    assert out["prob"].shape == (3, 1, 64, 64) and out["prob"].dtype == np.float32
    assert out["view_weights"].shape == (3, 3) and out["geometry_valid"].dtype == np.bool_
    timings = warm_up(engine, (1, 4))
    assert set(timings) == {1, 4}


def test_both_engines_agree(exported: Path) -> None:
    images = probe_batch(64, 2, seed=5).numpy()
    a = load_engine(exported, EngineSettings(kind="onnx")).run(images)
    b = load_engine(exported, EngineSettings(kind="torchscript")).run(images)
    np.testing.assert_allclose(a["prob"], b["prob"], atol=1e-4)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((1, 3, 32, 32), np.float32), "shape"),
        (np.zeros((1, 64, 64), np.float32), "shape"),
        (np.zeros((1, 3, 64, 64), np.float64), "float32"),
        (np.zeros((5, 3, 64, 64), np.float32), "batch of 5"),
        (np.full((1, 3, 64, 64), np.nan, np.float32), "NaN"),
        ([[0.0]], "numpy"),
    ],
)
def test_bad_batches_get_a_clear_error(exported: Path, images, message: str) -> None:
    engine = load_engine(exported, EngineSettings(max_batch_size=4))
    with pytest.raises(InvalidTensor, match=message) as info:
        engine.run(images)
    assert info.value.http_status == 400 and info.value.grpc_status == "INVALID_ARGUMENT"


def test_missing_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactNotFound, match="c2p export"):
        load_engine(tmp_path, EngineSettings())


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_artifact_is_refused(exported: Path, tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    name = "model.onnx" if kind == "onnx" else "model.ts"
    with open(folder / name, "r+b") as handle:
        handle.seek(100)
        handle.write(b"garbage")
    with pytest.raises(ArtifactInvalid, match="sha256"):
        load_engine(folder, EngineSettings(kind=kind))


@pytest.mark.parametrize("kind", KINDS)
def test_model_file_from_another_export_is_refused(exported: Path, tmp_path: Path, kind: str) -> None:
    """A card.json edited to another variant (or a mixed-up folder) must not load silently."""
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    card = json.loads((folder / "card.json").read_text())
    card["input"]["size"] = 128
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactInvalid, match="disagree"):
        load_engine(folder, EngineSettings(kind=kind))


def test_foreign_file_is_refused(exported: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    (folder / "model.onnx").write_bytes(b"not an onnx graph")
    card = json.loads((folder / "card.json").read_text())
    card["artifacts"]["model.onnx"]["sha256"] = __import__("hashlib").sha256(b"not an onnx graph").hexdigest()
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactInvalid, match="cannot load"):
        load_engine(folder, EngineSettings(kind="onnx"))


def test_cuda_request_without_cuda_is_refused(exported: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ArtifactInvalid, match="CUDA"):
        load_engine(exported, EngineSettings(device="cuda"))
