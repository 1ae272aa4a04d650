"""``c2p import-reference``: a reference checkpoint becomes ours, and serves what the reference computes.

A reference-shaped network (tests/models/reference_shaped.py: the reference's names, shapes and computation,
written from its facts) gets random weights and random BatchNorm statistics, is saved as the reference saves
its checkpoints, imported through the CLI and exported; then on the same inputs (384 x 384, batch 2):
  - our single-view fg logits equal the reference's within 1e-4 (eager);
  - the exported ONNX and TorchScript graphs' ``prob`` equal the reference's test-time consensus within 1e-3.
The base model (141M parameters) is built once per module: about 2 minutes on two CPU cores, export included.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.checkpoint import read_card, read_tensors, save_checkpoint
from models.consensus import OUTPUT_NAMES
from models.export import ONNX_FILE, TORCHSCRIPT_FILE, export_model, probe_batch
from models.files import sha256_file
from models.reference import IMPORTED_FROM, ReferenceImportError, import_reference, map_reference_state
from models.registry import build_c2p, get_config
from service.cli import main
from tests.models.reference_shaped import ReferenceShaped, mask_properties, reference_consensus

SIZE = 384
LOGIT_ATOL = 1e-4
PROB_ATOL = 1e-3


def _randomise_statistics(model: nn.Module, seed: int) -> None:
    """BatchNorm running statistics and affine terms, and every other norm's affine terms, away from their
    defaults: with ones and zeros everywhere a mapping that swapped two norms would go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.num_batches_tracked.fill_(1000)
            if isinstance(module, nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm):
                module.weight.uniform_(0.7, 1.3, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)


def _desaturate(model: ReferenceShaped, images: torch.Tensor) -> None:
    """Random weights give fg logits of std ~0.5 around +0.4 and GEO areas far from the masks' (u ~3, all three
    view weights ~1e-7 and alike): widen and centre the logits (the kernel's three layers scale as 1.8^3), then
    aim the area and centroid heads at the views' mean measured values, so that the views' own differences
    decide their weights."""
    kernel = model.kernel_generator_fg[3]
    with torch.no_grad():
        kernel.weight.mul_(1.8)
        kernel.bias.mul_(1.8)
        kernel.bias[576:] -= 0.1  # the last layer's 8 weights: a negative shift of the logits
        views = torch.cat([images, images.flip(3), images.flip(2)])
        fg = model(views)[0]
        measured = [mask_properties(p) for p in torch.sigmoid(fg[:, 0])]
        area = float(np.mean([a for a, _ in measured]))
        centroid = torch.tensor(np.mean([c for _, c in measured], axis=0), dtype=torch.float32)
        for head, target in (
            (model.geo_predictors[1][3], torch.tensor([area])),
            (model.geo_predictors[5][3], centroid),
        ):
            head.weight.mul_(0.1)
            head.bias.copy_(torch.logit(target))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return probe_batch(SIZE, 2, seed=5) * 1.5


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, images: torch.Tensor) -> tuple[ReferenceShaped, Path]:
    """The reference-shaped network with its checkpoint as the reference's training writes it."""
    torch.manual_seed(0)
    model = ReferenceShaped().eval()
    _randomise_statistics(model, seed=1)
    _desaturate(model, images)
    path = tmp_path_factory.mktemp("reference") / "c2p_epoch50.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def expected(reference: tuple[ReferenceShaped, Path], images: torch.Tensor) -> tuple[np.ndarray, ...]:
    """The reference's consensus, one image at a time as its code runs it: prob [B, 1, S, S], view weights [B, 3],
    and the views' unweighted mean [B, 1, S, S]."""
    results = [reference_consensus(reference[0], images[i : i + 1]) for i in range(images.shape[0])]
    prob, weights, plain = zip(*results, strict=True)
    return torch.cat(prob).numpy(), np.asarray(weights), torch.cat(plain).numpy()


@pytest.fixture(scope="module")
def imported(reference: tuple[ReferenceShaped, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "c2p-reference.safetensors"
    assert main(["import-reference", str(reference[1]), "--out", str(out), "--variant", "base"]) == 0
    return out


@pytest.fixture(scope="module")
def exported(imported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    export_model(str(imported), folder)
    return folder


def test_card_says_where_the_weights_came_from(imported: Path, reference: tuple[ReferenceShaped, Path]) -> None:
    card = read_card(imported)
    source = reference[1]
    assert card["imported"]["from"] == IMPORTED_FROM
    assert "Yundi218/Concept-to-Pixel" in IMPORTED_FROM
    assert card["imported"]["file"] == source.name and card["imported"]["variant"] == "base"
    assert card["imported"]["sha256"] == sha256_file(source)
    assert card["config"]["name"] == "c2p-reference-base-384" and card["config"]["layout"] == "reference"
    assert card["intended_use"].startswith("RESEARCH USE ONLY")


def test_single_view_logits_equal_the_references(
    reference: tuple[ReferenceShaped, Path], imported: Path, images: torch.Tensor
) -> None:
    model = reference[0]
    network = build_c2p(get_config("c2p-reference-base-384"), checkpoint=imported).eval()
    with torch.no_grad():
        fg, bg, geometry, sem = model(images)
        ours = network.segment(images)
        embeddings = network(images)["sem"]
    assert (fg - ours.fg).abs().max().item() <= LOGIT_ATOL
    assert (bg - ours.bg).abs().max().item() <= LOGIT_ATOL
    torch.testing.assert_close(ours.geometry[:, 4:5], geometry["area"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.geometry[:, 8:10], geometry["centroid"], atol=1e-5, rtol=0)
    torch.testing.assert_close(embeddings, sem, atol=1e-4, rtol=0)
    # Not a trivial pass: the masks are neither empty nor full and the logits not saturated.
    prob = torch.sigmoid(fg)
    assert 0.2 < (prob > 0.5).float().mean().item() < 0.9
    assert ((prob > 0.05) & (prob < 0.95)).float().mean().item() > 0.3


@pytest.mark.parametrize("runtime", ["onnx", "torchscript"])
def test_exported_consensus_equals_the_references(
    expected: tuple[np.ndarray, ...], exported: Path, images: torch.Tensor, runtime: str
) -> None:
    prob, weights, plain = expected
    if runtime == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(exported / ONNX_FILE), providers=["CPUExecutionProvider"])
        out = dict(zip(OUTPUT_NAMES, session.run(None, {"image": images.numpy()}), strict=True))
    else:
        module = torch.jit.load(str(exported / TORCHSCRIPT_FILE), map_location="cpu")
        with torch.no_grad():
            out = {k: v.numpy() for k, v in zip(OUTPUT_NAMES, module(images), strict=True)}
    gap = float(np.abs(out["prob"] - prob).max())
    assert gap <= PROB_ATOL, f"{runtime} prob differs from the reference consensus by {gap}"
    np.testing.assert_allclose(out["view_weights"], weights, rtol=1e-3, atol=1e-6)
    # Not a trivial pass: a real mask, no empty gate, and view weights that matter: fusing without them would
    # miss the reference's prob by far more than the tolerance.
    assert 0.1 < (prob > 0.5).mean() < 0.9 and not out["empty_gate"].any()
    assert (weights.max(1) > 1.2 * weights.min(1)).all(), f"the view weights {weights} hardly differ"
    assert np.abs(plain - prob).max() > 20 * PROB_ATOL


def test_export_card_names_the_layout_and_the_consensus(exported: Path) -> None:
    card = json.loads((exported / "card.json").read_text())
    assert card["layout"] == "reference"
    assert card["consensus"]["weighting"] == "reference" and "x = 0..W-1" in card["consensus"]["centroid"]
    assert card["weights"]["imported"]["from"] == IMPORTED_FROM
    assert card["outputs"][-1] == {"name": "concept_embedding", "shape": ["batch", 768], "dtype": "float32"}


def test_a_small_reference_layout_exports_with_parity(tmp_path: Path) -> None:
    """The reference layout at the test size, all its options on: it builds, gives 14 geometry numbers in [0, 1]
    and exports within the usual 1e-4 (export_model refuses otherwise)."""
    config = dataclasses.replace(
        get_config("c2p-test-64"),
        name="c2p-test-64-reference",
        layout="reference",
        orientation_values=1,
        align_corners=True,
        head_heads=2,
        consensus="reference",
        pooled_norm=True,
    )
    torch.manual_seed(0)
    network = build_c2p(config).eval()
    with torch.no_grad():
        geometry = network.segment(probe_batch(64)).geometry
    assert geometry.shape == (2, 14) and ((geometry >= 0) & (geometry <= 1)).all()
    card = export_model(str(save_checkpoint(network, tmp_path / "small.safetensors", config)), tmp_path / "export")
    assert card["layout"] == "reference" and card["consensus"]["weighting"] == "reference"


# -- what import refuses, each with a message that names the problem ---------------------------------------------


def _leave_marker(path: str) -> None:
    Path(path).write_text("ran")


class _Payload:
    """An object whose unpickling would call ``_leave_marker``: code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return _leave_marker, (str(self.marker),)


def _refused(path: Path, out: Path, caplog: pytest.LogCaptureFixture) -> str:
    """Run the CLI on ``path``: exit 2, a logged message and no traceback, nothing written."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="c2p"):
        assert main(["import-reference", str(path), "--out", str(out)]) == 2
    assert not out.exists() and not out.with_suffix(".json").exists()
    messages = [r.getMessage() for r in caplog.records if r.name == "c2p"]
    assert len(messages) == 1 and "Traceback" not in messages[0]
    return messages[0]


def test_a_pickle_with_code_is_refused_and_nothing_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "marker"
    zipped, legacy = tmp_path / "zipped.pth", tmp_path / "legacy.pth"
    torch.save({"geo_tokens": torch.zeros(9, 768), "payload": _Payload(marker)}, zipped)
    legacy.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    for path in (zipped, legacy):
        message = _refused(path, tmp_path / "out.safetensors", caplog)
        assert "refused" in message and "_leave_marker" in message and "nothing in the file was run" in message
    assert not marker.exists()


def test_files_that_are_not_state_dicts_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out.safetensors"
    cases = {
        "tensor.pth": (torch.zeros(3), "holds a Tensor, not a state dict"),
        "list.pth": ([torch.zeros(3)], "holds a list, not a state dict"),
        "numbers.pth": ({"geo_tokens": torch.zeros(9, 768), "epoch": 50}, "not named tensors: epoch"),
        "empty-dict.pth": ({}, "holds nothing"),
    }
    for name, (content, expected) in cases.items():
        torch.save(content, tmp_path / name)
        assert expected in _refused(tmp_path / name, out, caplog), name
    whole = tmp_path / "whole.pth"
    torch.save({"geo_tokens": torch.zeros(9, 768), "upconv5.weight": torch.zeros(1024, 512, 2, 2)}, whole)
    (tmp_path / "truncated.pth").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (tmp_path / "text.pth").write_text("not a checkpoint at all")
    for name in ("truncated.pth", "text.pth"):
        assert "cannot be read as a torch.save file: truncated or not a checkpoint" in _refused(
            tmp_path / name, out, caplog
        )
    assert main(["import-reference", str(tmp_path / "absent.pth"), "--out", str(out)]) == 2


def test_a_state_dict_of_something_else_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from models.network._timm import import_timm

    classifier = import_timm().create_model("convnextv2_atto", pretrained=False)
    torch.save(classifier.state_dict(), tmp_path / "timm.pth")
    message = _refused(tmp_path / "timm.pth", tmp_path / "out.safetensors", caplog)
    assert "a state dict of something else" in message and "0 of the 642 names" in message
    assert "bkbone.stem_0.weight" in message and "head.fc.weight" in message


def test_missing_unknown_and_misshaped_keys_are_named(reference: tuple[ReferenceShaped, Path], imported: Path) -> None:
    state = dict(reference[0].state_dict())
    expected = read_tensors(imported)
    del state["cross_attn_geo.to_q.weight"]
    state["cross_attn_geo.to_q.bias"] = torch.zeros(584)  # our layout's bias: not the reference's
    state["conv3_1.weight"] = torch.zeros(64, 192, 3, 3)
    with pytest.raises(ReferenceImportError) as caught:
        map_reference_state(state, expected, "c2p.pth")
    message = str(caught.value)
    assert "1 missing: cross_attn_geo.to_q.weight" in message
    assert "1 unknown: cross_attn_geo.to_q.bias" in message
    assert "1 mis-shaped: conv3_1.weight [64, 192, 3, 3] (expected [64, 256, 3, 3])" in message


def test_ddp_checkpoints_import_and_other_sizes_are_refused(
    reference: tuple[ReferenceShaped, Path], imported: Path, tmp_path: Path
) -> None:
    """Saved from inside DistributedDataParallel (as the reference's multi-GPU training runs), every key
    starts with ``module.``: the same tensors. No other size than base exists, and the error says why."""
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in reference[0].state_dict().items()}, ddp)
    weights = import_reference(ddp, tmp_path / "ddp.safetensors")
    first, second = read_tensors(weights), read_tensors(imported)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ReferenceImportError, match="hard-codes convnextv2_base's channels"):
        import_reference(ddp, tmp_path / "tiny.safetensors", variant="tiny")
