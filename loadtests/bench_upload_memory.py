"""Gateway memory per upload: how much a 150 MB upload raises the gateway's peak RSS, as JSON.

Starts a private Redis and ``c2p gateway`` as its own process (no worker: the job is admitted, stored and queued,
which is all the gateway does with an upload), warms it with one small upload, then for each case resets the
kernel's peak-RSS mark (``/proc/<pid>/clear_refs``), sends the upload from files on disk and reads the peak
(VmHWM) again. The cases: one 512 x 512 x 300 int16 NIfTI (150 MB, REST), the same volume as a DICOM series of 300
parts of 0.5 MB (REST multipart), and that series over STOW-RS. ``rss_growth_over_upload`` is the peak's growth
over the upload's size; the goal (issue 21) is at most 0.3.

    python loadtests/bench_upload_memory.py [--slices 300]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.bench_e2e import ct_volume, free_port
from service.queue.redis_server import PrivateRedis

GOAL = 0.3


def png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def wait_live(base: str, gateway: subprocess.Popen, timeout: float = 120) -> None:
    """Live, not ready: no worker runs here, the jobs only queue."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            raise SystemExit("the gateway exited during start-up")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/v2/health/live", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise SystemExit("the gateway did not start")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def reset_peak(pid: int) -> None:
    """From here on VmHWM is the peak since now (``5`` resets the peak RSS mark; Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def series(directory: Path, slices: int) -> list[Path]:
    """A CT series of ``slices`` 512 x 512 int16 slices, one file each (0.5 MB)."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    template.Rows = template.Columns = 512
    template.SeriesInstanceUID = generate_uid()
    rng = np.random.default_rng(5)
    paths = []
    for k in range(slices):
        template.SOPInstanceUID = generate_uid()
        template.InstanceNumber = k + 1
        template.ImagePositionPatient = [0.0, 0.0, 1.0 * k]
        template.PixelData = rng.integers(-1000, 1000, (512, 512), dtype=np.int16).tobytes()
        paths.append(directory / f"{k:04d}.dcm")
        template.save_as(paths[-1], enforce_file_format=True)
    return paths


def related_body(paths: list[Path], boundary: str) -> Iterator[bytes]:
    """A STOW-RS body streamed from the files (the client holds one at a time)."""
    for path in paths:
        yield b"--%s\r\nContent-Type: application/dicom\r\n\r\n" % boundary.encode()
        yield path.read_bytes()
        yield b"\r\n"
    yield b"--%s--\r\n" % boundary.encode()


def measure(pid: int, upload_bytes: int, send: Callable[[], httpx.Response]) -> dict[str, object]:
    reset_peak(pid)
    before = peak_rss_mb(pid)
    start = time.perf_counter()
    response = send()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb(pid)
    upload_mb = upload_bytes / 2**20
    return {
        "status": response.status_code,
        "upload_mb": round(upload_mb, 1),
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_growth_mb": round(peak - before, 1),
        "rss_growth_over_upload": round((peak - before) / upload_mb, 3),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300, help="slices of the volume and the series (512 x 512)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, PrivateRedis() as redis:
        work = Path(tmp)
        volume = work / "ct.nii"
        volume_bytes = ct_volume(volume, (512, 512, args.slices))
        paths = series(work, args.slices)
        series_bytes = sum(p.stat().st_size for p in paths)
        port = free_port()
        env = {**os.environ, "C2P_REDIS_URL": redis.url, "C2P_QUEUE__DEDUPE_WINDOW_S": "0"}
        command = [sys.executable, "-m", "service.cli", "gateway", "--port", str(port), "--grpc-port", str(free_port())]
        gateway = subprocess.Popen(command, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_live(base, gateway)
            with httpx.Client(base_url=base, timeout=300) as http:
                warm = http.post("/v1/segmentations", files=[("file", ("w.png", png(64), "image/png"))])
                assert warm.status_code == 202, warm.text
                cases: dict[str, dict[str, object]] = {}

                def rest(files: list[Path]) -> httpx.Response:
                    with contextlib.ExitStack() as stack:
                        parts = [("file", (p.name, stack.enter_context(p.open("rb")), "application/octet-stream"))
                                 for p in files]  # fmt: skip
                        return http.post("/v1/segmentations?modality=CT", files=parts)

                def stow() -> httpx.Response:
                    boundary = uuid.uuid4().hex
                    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
                    return http.post(
                        "/dicomweb/studies",
                        content=related_body(paths, boundary),
                        headers={"content-type": content_type},
                    )

                cases["nifti_rest"] = measure(gateway.pid, volume_bytes, lambda: rest([volume]))
                cases["dicom_series_rest"] = measure(gateway.pid, series_bytes, lambda: rest(paths))
                cases["dicom_series_stow"] = measure(gateway.pid, series_bytes, stow)
            worst = max(float(case["rss_growth_over_upload"]) for case in cases.values())
            report = {
                "benchmark": "gateway RSS growth per upload",
                "slices": args.slices,
                "cases": cases,
                "worst_rss_growth_over_upload": worst,
                "goal": GOAL,
                "meets_goal": worst <= GOAL and all(case["status"] in (200, 202) for case in cases.values()),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            }
            print(json.dumps(report, indent=2))
        finally:
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()


if __name__ == "__main__":
    main()
