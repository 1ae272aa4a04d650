"""End-to-end benchmark: the service on loopback against the raw engine on the same images, as JSON.

Starts a private Redis, ``c2p gateway`` and ``c2p worker`` as separate processes (so each one's peak
memory is its own), sends N images from concurrent clients over each API (REST upload, c2p.v1 gRPC, and the Open
Inference Protocol over REST and gRPC, in interleaved rounds), and measures the raw engine on the
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.config import EngineSettings, Settings, load_settings
from service.inputs import decode
from service.queue.redis_server import PrivateRedis
from service.worker import preprocess
from service.worker.artifacts import ensure_artifact
from service.worker.engine import load_engine

TARGETS = {"efficiency": 0.85, "gateway_rss_over_upload": 2.0, "grpc_vs_rest": 1.0}


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


Send = Callable[[bytes], Awaitable[bool]]  # one image -> succeeded?


async def run_clients(send: Send, images: list[bytes], concurrency: int) -> tuple[float, list[float], int]:
    """``concurrency`` clients take images from one list until it is empty: images/s, latencies, failures."""
    latencies: list[float] = []
    failures = 0
    pending = list(images)

    async def client() -> None:
        nonlocal failures
        while pending:
            image = pending.pop()
            start = time.perf_counter()
            ok = await send(image)
            latencies.append(time.perf_counter() - start)
            failures += not ok

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return len(images) / (time.perf_counter() - start), latencies, failures


def grey(image: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(image)) as picture:
        return np.asarray(picture.convert("L"))


async def drive(api: str, base: str, grpc_target: str, images: list[bytes], concurrency: int) -> dict[str, object]:
    """One API's run: REST upload, c2p.v1 gRPC, Open Inference Protocol over REST (binary) or gRPC."""
    import grpc

    from service.grpc import inference_pb2, inference_pb2_grpc, segmentation_pb2, segmentation_pb2_grpc

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http, grpc.aio.insecure_channel(grpc_target) as ch:
        segment = segmentation_pb2_grpc.SegmentationStub(ch)
        infer = inference_pb2_grpc.GRPCInferenceServiceStub(ch)

        async def rest(image: bytes) -> bool:
            files = [("file", ("i.png", image, "image/png"))]
            return (await http.post(f"{base}/v1/segmentations?wait=120", files=files)).status_code == 200

        async def rpc(image: bytes) -> bool:
            request = segmentation_pb2.SegmentRequest(
                files=[segmentation_pb2.File(name="i.png", data=image)], wait_seconds=120
            )
            job = await segment.Segment(request, timeout=130)
            return job.status == "succeeded"

        async def kserve_rest(image: bytes) -> bool:
            array = grey(image)
            header = json.dumps(
                {
                    "inputs": [
                        {"name": "image", "datatype": "UINT8", "shape": list(array.shape),
                         "parameters": {"binary_data_size": array.nbytes}}
                    ],
                    "outputs": [{"name": "score", "parameters": {"binary_data": True}}],
                }
            ).encode()  # fmt: skip
            response = await http.post(
                f"{base}/v2/models/c2p/infer",
                content=header + array.tobytes(),
                headers={
                    "Inference-Header-Content-Length": str(len(header)),
                    "Content-Type": "application/octet-stream",
                },
            )
            return response.status_code == 200

        async def kserve_grpc(image: bytes) -> bool:
            array = grey(image)
            request = inference_pb2.ModelInferRequest(
                model_name="c2p",
                inputs=[
                    inference_pb2.ModelInferRequest.InferInputTensor(
                        name="image", datatype="UINT8", shape=list(array.shape)
                    )
                ],
                outputs=[inference_pb2.ModelInferRequest.InferRequestedOutputTensor(name="score")],
                raw_input_contents=[array.tobytes()],
            )
            response = await infer.ModelInfer(request, timeout=130)
            return len(response.raw_output_contents) == 1

        send = {"rest": rest, "grpc": rpc, "kserve_rest": kserve_rest, "kserve_grpc": kserve_grpc}[api]
        await run_clients(send, images[:8], min(concurrency, 8))  # warm this path
        rate, latencies, failures = await run_clients(send, images, concurrency)
    return {
        "images_per_s": round(rate, 2),
        "p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "failures": failures,
    }


def volume_formats(base: str, redis_url: str, job_id: str) -> dict[str, object]:
    """What the derived formats cost on a volume: the kept value's size in Redis and each format's latency."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        kept_mb = client.strlen(f"c2p:outputs:{job_id}") / 2**20
    finally:
        client.close()
    out: dict[str, object] = {"kept_outputs_mb": round(kept_mb, 1)}
    for name, params in (("nifti", {"format": "nifti"}), ("dicom_seg", {"format": "dicom-seg"}),
                         ("png_slice", {"format": "png", "slice": 150})):  # fmt: skip
        start = time.perf_counter()
        answer = httpx.get(f"{base}/v1/segmentations/{job_id}/result", params=params, timeout=120)
        out[name] = {
            "status": answer.status_code,
            "ms": round((time.perf_counter() - start) * 1000, 1),
            "mb": round(len(answer.content) / 2**20, 2),
        }
    return out


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
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the four APIs (best kept)")
    parser.add_argument("--no-volume", action="store_true")
    args = parser.parse_args()

    settings = load_settings(model=args.model)
    settings.engine = EngineSettings(intra_op_threads=args.threads, max_batch_size=settings.engine.max_batch_size)
    directory = ensure_artifact(settings.model, settings.artifacts_dir, settings.engine.kind)
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
                "C2P_WORKER__OPS_PORT": str(free_port()),
            }
        )
        common = ["--model", str(directory)]
        grpc_port = free_port()
        ports = ["--port", str(port), "--grpc-port", str(grpc_port)]
        gateway = subprocess.Popen([sys.executable, "-m", "service.cli", "gateway", *ports, *common], env=env)
        worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", *common], env=env)
        try:
            wait_ready(base, [gateway, worker])
            target = f"127.0.0.1:{grpc_port}"
            # Interleaved rounds, so machine noise hits every API alike; each round sends all images.
            apis = ("rest", "grpc", "kserve_rest", "kserve_grpc")
            runs: dict[str, list[dict[str, object]]] = {api: [] for api in apis}
            for _ in range(args.rounds):
                for api in apis:
                    runs[api].append(asyncio.run(drive(api, base, target, images, args.concurrency)))
            by_api = {api: max(r, key=lambda x: x["images_per_s"]) for api, r in runs.items()}
            e2e = float(by_api["rest"]["images_per_s"])
            report: dict[str, object] = {
                "model": json.loads((directory / "card.json").read_text())["variant"],
                "images": len(images),
                "concurrency": args.concurrency,
                "threads": args.threads,
                "max_batch_size": settings.engine.max_batch_size,
                "rounds": args.rounds,
                "raw_engine_images_per_s": round(raw, 2),
                "e2e_images_per_s": e2e,
                "efficiency": round(e2e / raw, 3),
                "apis": by_api,
                "grpc_vs_rest": round(float(by_api["grpc"]["images_per_s"]) / e2e, 3),
                "failures": sum(int(r["failures"]) for r in by_api.values()),
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
                if response.status_code == 200:
                    report["volume"]["formats"] = volume_formats(base, redis.url, response.json()["id"])
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
