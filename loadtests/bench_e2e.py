"""End-to-end benchmark: the service on loopback against the raw engine on the same images, as JSON.

Starts a private Redis, ``c2p gateway`` and ``c2p worker`` as separate processes (so each one's peak
memory is its own), sends N images from concurrent HTTP clients, and measures the raw engine on the
same preprocessed images in this process while the service is idle: ``efficiency`` is end-to-end
images/s over raw engine images/s, both measured in this run. Then one 512x512x300 CT volume goes
through the service: seconds end to end and the peak RSS of gateway and worker against the upload.

    python loadtests/bench_e2e.py [--model c2p-femto-192] [--images 200] [--concurrency 8] [--no-volume]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service import preprocess
from service.artifacts import ensure_artifact
from service.config import EngineSettings, Settings, load_settings
from service.engine import load_engine
from service.inputs import decode
from service.redis_server import PrivateRedis

TARGETS = {"efficiency": 0.85, "gateway_rss_over_upload": 2.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set, kept by the kernel (no sampling misses a spike)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_images(n: int, size: int = 256, seed: int = 0) -> list[bytes]:
    """Grey images with one bright blob each at a random place: cheap to make, real PNG decoding."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = []
    for _ in range(n):
        cy, cx, r = rng.integers(60, size - 60), rng.integers(60, size - 60), rng.integers(15, 45)
        image = rng.normal(60, 12, (size, size))
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] += 110
        buffer = io.BytesIO()
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def ct_volume(path: Path, shape: tuple[int, int, int] = (512, 512, 300)) -> int:
    """An int16 CT-like volume in HU (body ellipse, lungs, noise) written as an uncompressed .nii."""
    rng = np.random.default_rng(1)
    x, y, z = shape
    yy, xx = np.mgrid[:y, :x]
    body = ((xx - x / 2) / (0.42 * x)) ** 2 + ((yy - y / 2) / (0.32 * y)) ** 2 < 1
    lungs = (((xx - 0.33 * x) / (0.1 * x)) ** 2 + ((yy - y / 2) / (0.2 * y)) ** 2 < 1) | (
        ((xx - 0.67 * x) / (0.1 * x)) ** 2 + ((yy - y / 2) / (0.2 * y)) ** 2 < 1
    )
    base = np.where(body, 40, -1000).astype(np.int16)
    base[lungs] = -850
    data = np.empty(shape, dtype=np.int16)
    for k in range(z):
        data[:, :, k] = (base + rng.integers(-20, 20, (y, x), dtype=np.int16)).T
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 1.0, 1.0])), path)
    return path.stat().st_size


def raw_engine(settings: Settings, directory: Path, images: list[bytes], seconds: float) -> float:
    """Images/s of the engine alone on the same images, preprocessed beforehand, in full batches."""
    engine = load_engine(directory, settings.engine)
    card = engine.artifact.card["input"]
    prepared = []
    for data in images:
        volume = decode([("x.png", data)], settings.limits)
        plan = preprocess.plan(volume, engine.artifact.input_size)
        prepared.extend(preprocess.slices(volume, plan, card["mean"], card["std"]))
    batch = settings.engine.max_batch_size
    batches = [np.stack(prepared[i : i + batch]) for i in range(0, len(prepared) - batch + 1, batch)]
    engine.run(batches[0])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for b in batches:
            engine.run(b)
            done += len(b)
    return done / (time.perf_counter() - start)


async def drive(base: str, images: list[bytes], concurrency: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for image in images:
        queue.put_nowait(image)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while not queue.empty():
            image = queue.get_nowait()
            start = time.perf_counter()
            response = await http.post(
                f"{base}/v1/segmentations?wait=120", files=[("file", ("i.png", image, "image/png"))]
            )
            latencies.append(time.perf_counter() - start)
            failures += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    return len(images) / elapsed, latencies, failures


def wait_ready(base: str, processes: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise SystemExit("a service process exited during start-up")
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit("the service did not become ready")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="variant, checkpoint or export folder (default: shipped)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-volume", action="store_true")
    args = parser.parse_args()

    settings = load_settings(model=args.model)
    settings.engine = EngineSettings(intra_op_threads=args.threads, max_batch_size=settings.engine.max_batch_size)
    directory = ensure_artifact(settings.model, settings.artifacts_dir)
    images = test_images(args.images)

    raw = raw_engine(settings, directory, images[: max(32, settings.engine.max_batch_size * 2)], seconds=5)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with PrivateRedis(unix_socket=True) as redis, tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("C2P_")}
        env.update(
            {
                "C2P_REDIS_URL": redis.url,
                "C2P_ENGINE__INTRA_OP_THREADS": str(args.threads),
                "C2P_LIMITS__MAX_UPLOAD_BYTES": str(1 << 30),
            }
        )
        common = ["--model", str(directory)]
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "gateway",
                "--port",
                str(port),
                "--grpc-port",
                str(free_port()),
                *common,
            ],
            env=env,
        )
        worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", *common], env=env)
        try:
            wait_ready(base, [gateway, worker])
            asyncio.run(drive(base, images[:16], args.concurrency))  # warm the path
            e2e, latencies, failures = asyncio.run(drive(base, images, args.concurrency))
            report: dict[str, object] = {
                "model": json.loads((directory / "card.json").read_text())["variant"],
                "images": len(images),
                "concurrency": args.concurrency,
                "threads": args.threads,
                "max_batch_size": settings.engine.max_batch_size,
                "e2e_images_per_s": round(e2e, 2),
                "raw_engine_images_per_s": round(raw, 2),
                "efficiency": round(e2e / raw, 3),
                "latency_ms": {
                    "p50": round(percentile(latencies, 50) * 1000, 1),
                    "p99": round(percentile(latencies, 99) * 1000, 1),
                    "mean": round(statistics.fmean(latencies) * 1000, 1),
                },
                "failures": failures,
            }
            if not args.no_volume:
                path = Path(tmp) / "ct.nii"
                upload = ct_volume(path)
                base_gateway, base_worker = peak_rss_mb(gateway.pid), peak_rss_mb(worker.pid)
                start = time.perf_counter()
                with path.open("rb") as handle:
                    response = httpx.post(
                        f"{base}/v1/segmentations?wait=290&modality=CT",
                        files=[("file", ("ct.nii", handle, "application/octet-stream"))],
                        timeout=300,
                    )
                seconds = time.perf_counter() - start
                upload_mb = upload / 2**20
                gateway_peak = peak_rss_mb(gateway.pid)
                report["volume"] = {
                    "shape": [300, 512, 512],
                    "status": response.status_code,
                    "seconds": round(seconds, 2),
                    "upload_mb": round(upload_mb, 1),
                    "gateway_peak_rss_mb": round(gateway_peak, 1),
                    "gateway_peak_rss_before_mb": round(base_gateway, 1),
                    "worker_peak_rss_mb": round(peak_rss_mb(worker.pid), 1),
                    "worker_peak_rss_before_mb": round(base_worker, 1),
                    "gateway_rss_over_upload": round(gateway_peak / upload_mb, 3),
                }
            report["targets"] = TARGETS
            report["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
            print(json.dumps(report, indent=2))
        finally:
            for process in (gateway, worker):
                process.send_signal(signal.SIGTERM)
            for process in (gateway, worker):
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()


if __name__ == "__main__":
    main()
