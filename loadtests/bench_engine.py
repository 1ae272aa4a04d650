"""Engine benchmark: images/s for eager PyTorch, TorchScript and ONNX Runtime, side by side, as JSON.

All three run the same serving graph (network + 3-view consensus) with the same weights and thread
count, measured in interleaved rounds in one process so machine noise hits them alike. Compute
efficiency compares the GMAC/s the graph achieves with a float32 matmul's GMAC/s measured in the same
run: how much of what this machine can multiply the model turns into segmentation.

    python loadtests/bench_engine.py [--variant c2p-femto-256] [--batches 1 4 16] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoint import save_checkpoint
from models.export import ServingGraph, export_model, probe_batch
from models.registry import build_c2p, get_config
from service.config import EngineSettings
from service.worker.engine import load_engine

TARGETS = {"ort_vs_eager": 2.0, "compute_efficiency": 0.3}


def macs_per_image(graph: torch.nn.Module, size: int) -> float:
    """Multiply-accumulates of one image through the serving graph (3 views + consensus)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        graph(probe_batch(size, 1))
    return counter.get_total_flops() / 2


def matmul_gmacs(threads: int, n: int = 2048, seconds: float = 2.0) -> float:
    """float32 GEMM throughput of this machine with the same threads: the ceiling for dense compute."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, n**3 / (time.perf_counter() - start) / 1e9)
    return best


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(runners: dict[str, Callable[[], object]], batch: int, seconds: float) -> dict[str, float]:
    """Interleaved rounds (A, B, C, A, B, C, ...) until each has had ``seconds``; median images/s."""
    for run in runners.values():
        run()  # warm-up: first-call allocation and kernel selection
    samples: dict[str, list[float]] = {name: [] for name in runners}
    spent = dict.fromkeys(runners, 0.0)
    while min(spent.values()) < seconds or min(len(s) for s in samples.values()) < 3:
        for name, run in runners.items():
            elapsed = timed(run)
            samples[name].append(batch / elapsed)
            spent[name] += elapsed
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="c2p-femto-256")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per engine and batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--artifact", help="reuse an export folder made from --variant (skips the export)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = get_config(args.variant)
    torch.manual_seed(0)
    network = build_c2p(config).eval()
    graph = ServingGraph(network).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.artifact) if args.artifact else Path(tmp) / "export"
        if not args.artifact:
            checkpoint = save_checkpoint(network, Path(tmp) / "bench.safetensors", config)
            export_model(str(checkpoint), folder, check=False)
        settings = EngineSettings(intra_op_threads=args.threads, max_batch_size=max(args.batches))
        ort_engine = load_engine(folder, settings.model_copy(update={"kind": "onnx"}))
        ts_engine = load_engine(folder, settings.model_copy(update={"kind": "torchscript"}))

        macs = macs_per_image(graph, config.input_size)
        results: dict[str, dict[str, float]] = {"eager": {}, "torchscript": {}, "onnxruntime": {}}
        for batch in args.batches:
            images = probe_batch(config.input_size, batch, seed=batch).numpy()
            tensor = torch.from_numpy(images)

            def eager(tensor: torch.Tensor = tensor) -> object:
                with torch.inference_mode():
                    return graph(tensor)

            runners = {
                "eager": eager,
                "torchscript": lambda images=images: ts_engine.run(images),
                "onnxruntime": lambda images=images: ort_engine.run(images),
            }
            for name, value in measure(runners, batch, args.seconds).items():
                results[name][str(batch)] = round(value, 3)
        gemm = matmul_gmacs(args.threads)

    gmacs = {name: {b: round(v * macs / 1e9, 2) for b, v in per.items()} for name, per in results.items()}
    first, last = str(args.batches[0]), str(args.batches[-1])
    report = {
        "variant": config.name,
        "input_size": config.input_size,
        "views_per_image": 3,
        "threads": args.threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__},
        "gmacs_per_image": round(macs / 1e9, 3),
        "matmul_gmacs_per_s": round(gemm, 2),
        "images_per_s": results,
        "gmacs_per_s": gmacs,
        "ort_vs_eager": round(results["onnxruntime"][first] / results["eager"][first], 3),
        "torchscript_vs_eager": round(results["torchscript"][first] / results["eager"][first], 3),
        "compute_efficiency": round(max(g[last] for g in gmacs.values()) / gemm, 3),
        "compute_efficiency_by_engine": {name: round(g[last] / gemm, 3) for name, g in gmacs.items()},
        "batch_for_ratio": int(first),
        "batch_for_efficiency": int(last),
        "targets": TARGETS,
    }
    report["meets_targets"] = {k: report[k] >= v for k, v in TARGETS.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
