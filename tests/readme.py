"""The README's fenced commands, read as a newcomer would copy them, and what they need to run here."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def fenced_blocks(text: str, language: str = "bash") -> list[list[str]]:
    """Each ```bash block's commands: one per line, trailing comments and blank lines dropped."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)
    return [[line for line in (_strip_comment(raw) for raw in block.splitlines()) if line] for block in blocks]


def _strip_comment(line: str) -> str:
    # A '#' after whitespace outside quotes starts a comment (none of the README's commands quote a '#').
    return re.split(r"\s+#", line, maxsplit=1)[0].strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def series(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """A real CT slice (pydicom's CT_small) made into a series of len(names) slices 5 mm apart."""
    source = dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = generate_uid()
    # Read once: Dataset.copy() is shallow, so setting a copy's position once moved the source's too and the
    # slices came out 0, 5, 15 mm apart (a gapped series, which the service now refuses).
    x, y, z = (float(v) for v in source.ImagePositionPatient)
    paths = []
    for index, name in enumerate(names):
        slice_ = copy.deepcopy(source)
        slice_.SeriesInstanceUID = series_uid
        slice_.SOPInstanceUID = generate_uid()
        slice_.file_meta.MediaStorageSOPInstanceUID = slice_.SOPInstanceUID
        slice_.InstanceNumber = index + 1
        slice_.ImagePositionPatient = [x, y, z + 5.0 * index]
        slice_.SliceLocation = z + 5.0 * index
        path = folder / name
        slice_.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def nifti(path: Path) -> Path:
    """A small MR-like volume: a bright ellipsoid in a darker head-shaped background, 1 x 1 x 3 mm."""
    _z, y, x = np.mgrid[0:4, 0:80, 0:96]
    head = (((x - 48) / 40.0) ** 2 + ((y - 40) / 34.0) ** 2) < 1
    blob = (((x - 60) / 9.0) ** 2 + ((y - 34) / 7.0) ** 2) < 1
    volume = (head * 300 + blob * 500).astype(np.int16).transpose(2, 1, 0)  # x, y, z as NIfTI stores it
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 3.0, 1.0])), path)
    return path


def inputs(folder: Path) -> None:
    """The files the README's examples name, made from real data that ships inside packages."""
    folder.joinpath("ct_slice.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    series(folder, ("a.dcm", "b.dcm"))
    (folder / "series_folder").mkdir()
    series(folder / "series_folder", ("1.dcm", "2.dcm", "3.dcm"))
    nifti(folder / "scan.nii.gz")


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], cwd: Path, url: str, timeout_s: float = 90) -> Iterator[Path]:
    """Start a service command, wait for its readiness, yield its log so far; SIGTERM and wait for it after."""
    log = cwd / "service.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert process.poll() is None, f"the service exited {process.returncode}:\n{log.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"not ready after {timeout_s} s:\n{log.read_text()}"
            time.sleep(0.2)
        yield log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def service_env(tmp: Path, port: int, grpc_port: int) -> dict[str, str]:
    """The environment a newcomer's shell has: no C2P_ settings but the ports (this machine runs other things) and
    a cache of the test's own; the venv's bin first on PATH, where pip put ``c2p``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("C2P_")}
    env.update(
        C2P_PORT=str(port),
        C2P_GRPC_PORT=str(grpc_port),
        C2P_CACHE_DIR=str(tmp / "cache"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env
