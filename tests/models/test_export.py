"""The exported graph must compute what eager PyTorch computes (C2P's reference code never checked)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models.checkpoint import save_checkpoint
from models.consensus import OUTPUT_NAMES
from models.export import ONNX_FILE, TORCHSCRIPT_FILE, ServingGraph, export_model, probe_batch
from models.files import ONNX_METADATA_KEY, TORCHSCRIPT_CARD_FILE
from models.geometry import measure
from models.registry import build_c2p, get_config
from tests.conftest import seeded_network

ATOL = 1e-4
# Fused probability and geometry within 1e-4 (the bar); the rest of the continuous outputs too.
COMPARED = ("prob", "geometry_pred", "view_weights", "view_inconsistency", "view_agreement")


def eager_outputs(network: torch.nn.Module, images: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in ServingGraph(network).eval()(torch.from_numpy(images))._asdict().items()}


def onnx_outputs(folder: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUT_NAMES, session.run(None, {"image": images}), strict=True))


def torchscript_outputs(folder: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    module = torch.jit.load(str(folder / TORCHSCRIPT_FILE), map_location="cpu")
    with torch.no_grad():
        return {k: v.numpy() for k, v in zip(OUTPUT_NAMES, module(torch.from_numpy(images)), strict=True)}


def assert_parity(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> None:
    for name in COMPARED:
        np.testing.assert_allclose(other[name], reference[name], atol=ATOL, rtol=0, err_msg=name)
    np.testing.assert_array_equal(other["empty_gate"], reference["empty_gate"])
    # The measured geometry is a step function of prob at 0.5: a pixel 1e-7 from the threshold may land
    # on either side in another runtime. So check it is exactly the geometry of the runtime's own mask.
    values, valid = measure(torch.from_numpy(other["prob"][:, 0]), 0.5)
    np.testing.assert_allclose(other["geometry_mask"], values.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(other["geometry_valid"], valid.numpy())


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("runtime", [onnx_outputs, torchscript_outputs], ids=["onnxruntime", "torchscript"])
def test_parity_with_eager(exported: Path, runtime, batch: int) -> None:
    images = probe_batch(64, batch, seed=10 + batch).numpy() * 2
    reference = eager_outputs(seeded_network(), images)
    out = runtime(exported, images)
    assert out["prob"].shape == (batch, 1, 64, 64)
    assert_parity(reference, out)


def test_onnx_checker_and_dynamic_batch_axis(exported: Path) -> None:
    model = onnx.load(str(exported / ONNX_FILE))
    onnx.checker.check_model(model, full_check=True)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)


def test_card_describes_the_artifacts(exported: Path, test_checkpoint: Path) -> None:
    card = json.loads((exported / "card.json").read_text())
    assert card["variant"] == "c2p-test-64"
    assert card["input"]["size"] == 64 and card["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert [o["name"] for o in card["outputs"]] == list(OUTPUT_NAMES)
    assert card["weights"]["source"] == test_checkpoint.name and card["weights"]["note"] == "tests"
    assert card["digest"] == card["artifacts"][ONNX_FILE]["sha256"]
    assert card["layout"] == "c2p" and card["consensus"]["weighting"] == "relative"
    assert max(max(v.values()) for v in card["parity"].values()) <= ATOL
    embedded = {p.key: p.value for p in onnx.load(str(exported / ONNX_FILE)).metadata_props}
    assert json.loads(embedded[ONNX_METADATA_KEY])["config"] == card["config"]
    extra = {TORCHSCRIPT_CARD_FILE: ""}
    torch.jit.load(str(exported / TORCHSCRIPT_FILE), _extra_files=extra)
    assert json.loads(extra[TORCHSCRIPT_CARD_FILE])["input"] == card["input"]


@pytest.mark.slow
def test_shipped_variant_exports_with_parity(tmp_path: Path) -> None:
    """The variant the service ships, at its real size: parity at batch 1 and 4 through both runtimes."""
    torch.manual_seed(3)
    network = build_c2p("c2p-femto-256").eval()
    checkpoint = save_checkpoint(network, tmp_path / "femto.safetensors", get_config("c2p-femto-256"))
    folder = tmp_path / "export"
    export_model(str(checkpoint), folder)
    for batch in (1, 4):
        images = probe_batch(256, batch, seed=batch).numpy()
        reference = eager_outputs(network, images)
        assert_parity(reference, onnx_outputs(folder, images))
        assert_parity(reference, torchscript_outputs(folder, images))


def test_export_refuses_unknown_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a known variant"):
        export_model("not-a-model", tmp_path)
