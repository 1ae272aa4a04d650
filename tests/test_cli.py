from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.checkpoint import save_checkpoint
from models.registry import get_config
from service.cli import build_parser, main
from service.worker.artifacts import ensure_artifact
from tests.conftest import seeded_network


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "serve" in out and "export" in out


def test_export_needs_model_and_out() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export"])


def test_export_of_an_unknown_model_fails_cleanly(tmp_path: Path) -> None:
    assert main(["export", "--model", "c2p-nope", "--out", str(tmp_path)]) == 2


def test_segment_writes_json_nifti_and_png(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import nibabel as nib
    import numpy as np
    from PIL import Image

    from service.outputs import rle
    from service.schema import SegmentationResult

    data = np.zeros((48, 40, 5), dtype=np.int16)
    data[12:36, 10:30, 1:4] = 500
    affine = np.diag([0.9, 0.8, 3.0, 1.0])
    affine[:3, 3] = [5, -7, 11]
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "brain.nii.gz")
    picture = np.full((64, 80), 30, dtype=np.uint8)
    picture[20:40, 30:60] = 220
    Image.fromarray(picture).save(tmp_path / "photo.png")
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")

    out = tmp_path / "out"
    inputs = [str(tmp_path / n) for n in ("brain.nii.gz", "photo.png", "broken.dcm")]
    code = main(["segment", *inputs, "--out", str(out), "--format", "json,nifti,png", "--model", str(exported)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1  # one input failed, and says why
    assert summary[2]["error"]["code"] in ("invalid_image", "unsupported_format")

    result = SegmentationResult.model_validate_json((out / "brain.json").read_text())
    assert result.input.shape == (5, 40, 48) and len(result.mask.slices) == 5
    # sliced axially in the display convention (columns to the left, rows to posterior): this RAS file's x and y
    # reversed; the NIfTI goes back on the file's own grid
    assert (result.input.stored_orientation, result.input.orientation) == ("RAS", "LPS")
    labelmap = nib.load(out / "brain.nii.gz")
    assert labelmap.shape == data.shape and np.allclose(labelmap.affine, affine)
    stored = np.asarray(labelmap.dataobj)
    for entry in result.mask.slices:  # the NIfTI and the RLE hold the same masks
        mask = rle.decode({"size": list(result.mask.size), "counts": entry.counts})
        assert np.array_equal(stored[::-1, ::-1, entry.index].T, mask)
    with Image.open(out / "photo.png") as overlay:
        assert overlay.size == (80, 64) and overlay.mode == "RGB"
    assert (out / "photo.json").is_file() and not (out / "broken.json").exists()


def test_segment_refuses_unknown_formats(exported: Path, tmp_path: Path) -> None:
    assert main(["segment", str(tmp_path), "--out", str(tmp_path / "o"), "--format", "dicom-sr"]) == 2


def test_gateway_and_worker_need_a_shared_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("C2P_REDIS_URL", raising=False)
    assert main(["gateway"]) == 2
    assert main(["worker"]) == 2


def test_serve_refuses_a_broken_model(tmp_path: Path) -> None:
    assert main(["serve", "--model", str(tmp_path / "missing.safetensors")]) == 2


def test_artifacts_are_exported_once_and_reused(tmp_path: Path, exported: Path, monkeypatch) -> None:
    checkpoint = save_checkpoint(seeded_network(), tmp_path / "m.safetensors", get_config("c2p-test-64"))
    calls = []

    def fake_export(model: str, out: Path) -> None:  # the real export is covered elsewhere; count calls
        calls.append(model)
        shutil.copytree(exported, out, dirs_exist_ok=True)

    monkeypatch.setattr("models.export.export_model", fake_export)
    cache = tmp_path / "cache"
    first = ensure_artifact(str(checkpoint), cache)
    second = ensure_artifact(str(checkpoint), cache)
    assert first == second and calls == [str(checkpoint)]
    assert [p.name for p in cache.iterdir()] == [first.name]  # no staging folders left behind
    assert ensure_artifact(str(exported), cache) == exported


def test_models_lists_what_a_configuration_serves_with_its_streams(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a Helm worker pool's lanes must name, read from the cards (issue 19)."""
    import shutil

    shutil.copytree(exported, tmp_path / "repo" / "alpha" / "3")
    capsys.readouterr()
    assert main(["models", "--model", str(exported), "--repository", str(tmp_path / "repo")]) == 0
    listed = json.loads(capsys.readouterr().out)["models"]
    digest = json.loads((exported / "card.json").read_text())["artifacts"]["model.onnx"]["sha256"]
    assert [(m["name"], m["version"], m["default"]) for m in listed] == [
        ("c2p-test-64", digest[:12], True),
        ("alpha", "3", False),
    ]
    assert {m["stream"] for m in listed} == {f"c2p:jobs:{digest[:12]}"}  # the same artifact: one stream
    assert main(["models", "--repository", str(tmp_path / "missing")]) == 2
