"""The wheel is what a container installs: it must carry the generated gRPC code and the shipped model, and an
installed service must import without protos and without writing into site-packages (read-only in an image)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "models", "service", "proto")


@pytest.mark.slow
def test_the_wheel_carries_generated_grpc_code_and_the_model(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "gen", "*.egg-info")  # gen: the build must make its own
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # No build isolation: the build requirements (setuptools, grpcio-tools) are installed here already, and a test
    # must not reach for the network.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("c2p_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "service/grpc/gen/PROTO_HASH",
        "service/grpc/gen/c2p/v1/segmentation_pb2.py",
        "service/grpc/gen/c2p/v1/segmentation_pb2_grpc.py",
        "service/grpc/gen/inference/grpc_service_pb2.py",
        "models/weights/c2p-femto-192.safetensors",
        "models/weights/c2p-femto-192.json",
        "models/weights/c2p-femto-192.onnx",  # the serving graph without its weights (models/restore.py)
        "models/weights/c2p-femto-192.export.json",
    ):
        assert expected in names, expected
    assert not any(name.startswith("proto/") for name in names)

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True, cwd=tmp_path)
    gen = site / "service" / "grpc" / "gen"
    before = {p: p.stat().st_mtime_ns for p in gen.rglob("*") if "__pycache__" not in p.parts}
    probe = (
        "import service, service.grpc as g;"
        "print(service.__file__);"
        "print(g.segmentation_pb2.SegmentRequest.DESCRIPTOR.full_name, g.inference_pb2.ModelInferRequest.__module__)"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path, env=env
    ).stdout.split()
    assert Path(out[0]).is_relative_to(site), out  # the installed copy, not the checkout
    assert out[1:] == ["c2p.v1.SegmentRequest", "service.grpc.gen.inference.grpc_service_pb2"]
    after = {p: p.stat().st_mtime_ns for p in gen.rglob("*") if "__pycache__" not in p.parts}
    assert after == before  # trusted as built: nothing regenerated or written
