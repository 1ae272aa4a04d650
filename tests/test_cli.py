from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.checkpoint import save_checkpoint
from models.registry import get_config
from service.artifacts import ensure_artifact
from service.cli import build_parser, main
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


def test_serve_loads_warms_and_reports(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", str(exported)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "c2p-test-64" and report["device"] == "cpu"
    assert set(report["warmup_seconds"]) == {"1", "16"}


def test_serve_refuses_a_broken_model(tmp_path: Path) -> None:
    assert main(["serve", "--model", str(tmp_path / "missing.safetensors")]) == 2


def test_artifacts_are_exported_once_and_reused(tmp_path: Path, exported: Path, monkeypatch) -> None:
    checkpoint = save_checkpoint(seeded_network(), tmp_path / "m.safetensors", get_config("c2p-test-64"))
    calls = []

    def fake_export(model: str, out: Path) -> None:  # the real export is covered elsewhere; count calls
        calls.append(model)
        shutil.copytree(exported, out, dirs_exist_ok=True)

    monkeypatch.setattr("service.artifacts.export_model", fake_export)
    cache = tmp_path / "cache"
    first = ensure_artifact(str(checkpoint), cache)
    second = ensure_artifact(str(checkpoint), cache)
    assert first == second and calls == [str(checkpoint)]
    assert [p.name for p in cache.iterdir()] == [first.name]  # no staging folders left behind
    assert ensure_artifact(str(exported), cache) == exported
