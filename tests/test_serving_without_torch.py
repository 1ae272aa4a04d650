"""A serving install has no torch, timm or onnx: ``c2p segment`` and ``c2p serve`` must work with the bundled model
all the same, from the graph the package ships (models.restore), and nothing may import them on the way.

The test environment has torch (it trains and exports), so the child processes here refuse those imports outright:
any path of the service that reaches for them fails as it would in a serving install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from models.files import CARD_FILE, ONNX_FILE, WEIGHTS_DATA_FILE
from tests.readme import free_port, nifti, running, service_env
from tests.service.harness import disc_image, png_bytes

BLOCKED = ("torch", "torchvision", "timm", "onnx", "onnxscript", "onnx_ir")
# The c2p command with the training stack made unimportable; argv as for c2p.
NO_TORCH = f"""
import sys
from importlib.abc import MetaPathFinder

class Hide(MetaPathFinder):
    # Every finder as before, but the training stack is not there: find_spec says None, import raises.
    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec
        return None

    def find_distributions(self, context=None):
        for finder in self.finders:
            if hasattr(finder, "find_distributions"):
                yield from finder.find_distributions(context)

sys.meta_path[:] = [Hide(list(sys.meta_path))]
from service.cli import main
sys.exit(main(sys.argv[1:]))
"""


pytestmark = pytest.mark.slow


def c2p(tmp: Path) -> list[str]:
    script = tmp / "c2p_no_torch.py"
    script.write_text(NO_TORCH)
    return [sys.executable, str(script)]


def test_the_blocker_blocks(tmp_path: Path) -> None:
    """The harness itself: an export through it fails on the missing torch, with the service's own message."""
    env = service_env(tmp_path, free_port(), free_port())
    result = subprocess.run(
        [*c2p(tmp_path), "segment", "x.png", "--out", "out", "--model", "c2p-test-64"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "needs torch" in result.stderr and "[train]" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_segment_without_torch_uses_the_shipped_graph(tmp_path: Path) -> None:
    env = service_env(tmp_path, free_port(), free_port())
    nifti(tmp_path / "scan.nii.gz")
    (tmp_path / "disc.png").write_bytes(png_bytes(disc_image((96, 128), 30)))
    result = subprocess.run(
        [*c2p(tmp_path), "segment", "scan.nii.gz", "disc.png", "--out", "out", "--format", "json,nifti,png", "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [Path(entry["input"]).name for entry in summary] == ["scan.nii.gz", "disc.png"]
    for name in ("scan.json", "scan.nii.gz", "scan.png", "disc.json", "disc.png"):
        assert (tmp_path / "out" / name).is_file(), name
    result_json = json.loads((tmp_path / "out" / "disc.json").read_text())
    assert result_json["model"]["name"] == "c2p-femto-192"
    # the folder the engine ran: restored from the shipped graph, not exported (no model.ts, which needs torch)
    (folder,) = (tmp_path / "cache" / "artifacts").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == sorted([CARD_FILE, ONNX_FILE, WEIGHTS_DATA_FILE])


def test_serve_without_torch_answers_and_logs_once(tmp_path: Path) -> None:
    port = free_port()
    env = service_env(tmp_path, port, free_port())
    url = f"http://127.0.0.1:{port}"
    with running([*c2p(tmp_path), "serve"], env, tmp_path, url) as log:
        answer = httpx.post(
            f"{url}/v1/segmentations?wait=60", files={"file": ("disc.png", png_bytes(disc_image((96, 128), 30)))},
            timeout=90,
        )  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "succeeded"
        missing = httpx.get(f"{url}/v1/segmentations/{'A' * 22}", timeout=10)
        assert missing.status_code == 404
    text = log.read_text()
    assert text.count("shutting down") == 1, text
    assert "Traceback" not in text, text
    assert os.listdir(tmp_path / "cache") == ["artifacts"], "the private Redis's folder is removed on exit"
