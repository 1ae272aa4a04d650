"""The README runs as written: its first lines install and start the service or run the tests, and every example
command in it works against the service those lines start, on real inputs made here."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from tests.readme import README, ROOT, fenced_blocks, free_port, inputs, running, service_env

BLOCKS = fenced_blocks(README.read_text())
LOCK_FLAG = "-c requirements/lock.txt"


def test_the_first_lines_are_the_serve_and_test_commands() -> None:
    assert README.read_text().startswith("```bash\n"), "the README opens with the two commands"
    serve, tests = BLOCKS[0]
    assert serve.endswith("&& c2p serve") and "'.[cpu]'" in serve, serve
    assert tests.endswith("&& python3 -m pytest -q") and "'.[cpu,test]'" in tests, tests
    for line in (serve, tests):
        assert LOCK_FLAG in line, f"{line!r} must install through the lock"


def test_ci_runs_exactly_the_readme_test_command_in_a_fresh_venv() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    _, tests = BLOCKS[0]
    assert tests in script.splitlines(), ".ci/run must run the README's test command verbatim"
    assert "-m venv" in script, ".ci/run installs into a virtual environment of its own"
    assert "pip freeze" in script, ".ci/run logs what it installed"


@pytest.mark.slow
def test_the_serve_install_line_installs_no_torch(tmp_path: Path) -> None:
    """The README's serve install, resolved by pip against the lock (nothing installed): ONNX Runtime, no torch."""
    install = BLOCKS[0][0].split(" && ")[0]
    report = tmp_path / "report.json"
    command = [*shlex.split(install), "--dry-run", "--ignore-installed", "--no-build-isolation", "-q", "--report"]
    command = [sys.executable if word == "python3" else word for word in command] + [str(report)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "onnxruntime" in names and "fastapi" in names, sorted(names)
    assert not names & {"torch", "torchvision", "timm", "onnx", "onnxscript", "onnxruntime-gpu"}, sorted(names)


def _run(line: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{line}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _finished(url: str, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = httpx.get(f"{url}/v1/segmentations/{job_id}", timeout=10).json()
        if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (Debian package curl)")
def test_the_readme_examples_run_against_the_readme_service(tmp_path: Path) -> None:
    """``c2p serve`` as the first line starts it (bundled model, CPU, private Redis), then each example line as
    written, with the port this test got and the job id the previous line printed."""
    port, grpc_port = free_port(), free_port()
    env = service_env(tmp_path, port, grpc_port)
    inputs(tmp_path)
    url = f"http://127.0.0.1:{port}"
    serve = BLOCKS[0][0].split(" && ")[1]
    examples = BLOCKS[1]
    assert any(line.startswith("c2p segment") for line in examples)
    job_id = None
    with running(shlex.split(serve), env, tmp_path, url) as log:
        for line in examples:
            line = line.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            if "JOB_ID" in line:
                assert job_id is not None, "an example uses JOB_ID before any printed one"
                assert _finished(url, job_id)["status"] == "succeeded"
                line = line.replace("JOB_ID", job_id)
            out = _run(line, tmp_path, env)
            if line.startswith("curl -F"):
                job = json.loads(out)
                assert job["status"] in ("queued", "running", "succeeded"), job
                job_id = job["id"]
    log_text = log.read_text()  # after the with: the service has been stopped
    assert log_text.count("shutting down") == 1, log_text
    speakers = set(re.findall(r"^INFO ([\w.]+):", log_text, flags=re.M))
    assert {name.split(".")[0] for name in speakers} <= {"c2p", "service", "models"}, speakers
    seg = dcmread(tmp_path / "seg.dcm")
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    results = tmp_path / "results"
    for name in ("scan.json", "scan.nii.gz", "scan.png", "series_folder.json", "series_folder.seg.dcm"):
        assert (results / name).is_file(), sorted(p.name for p in results.iterdir())
    assert not (results / "scan.seg.dcm").exists(), "a NIfTI has no DICOM references for a SEG"
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name != "artifacts"]
    assert leftovers == [], f"the service left {leftovers} in its cache folder"
