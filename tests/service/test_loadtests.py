"""The load tests themselves: their inputs are real files the service accepts, locust's REST and gRPC users run
headless against a live service without a failure, and soak.py reports memory with figures that make sense.

Here rather than in tests/ because the live service needs this folder's fixtures (a real Redis, the exported test
model). One service serves both runs, in this process: the gateway under uvicorn on a loopback port with a worker on
the same loop (``serving_http``) and the gRPC server beside them, so no model is loaded twice on a 2-core CI machine.
locust and soak.py run as the subprocesses they are in real use.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import redis.asyncio as aioredis

from loadtests.inputs import WEIGHTS, load_inputs
from loadtests.soak import Sample, judge
from service.auth import entry_for, new_key
from service.config import LimitSettings, QueueSettings
from service.grpc.server import build_server, stop_server
from service.inputs import decode, probe
from service.ops.metrics import Metrics
from tests.service.harness import engine_for, free_port, make_settings, serving_http

ROOT = Path(__file__).resolve().parents[2]
LOCUST_SECONDS = 8
SOAK_MINUTES = 0.3


def test_the_inputs_are_real_files_the_service_accepts() -> None:
    inputs = load_inputs()
    assert set(inputs) == set(WEIGHTS)
    formats = {"dicom-ct": "dicom", "dicom-mr": "dicom", "dicom-series": "dicom", "nifti-mni": "nifti"}
    for kind, item in inputs.items():
        files = list(item.files)
        header = probe(files, LimitSettings(), item.modality)  # the gateway's check, headers only
        volume = decode(files, LimitSettings(), item.modality)  # the worker's, every pixel
        assert header.format == formats.get(kind, "png"), kind
        assert header.shape == volume.shape == item.shape, kind
        assert np.ptp(volume.pixels) > 0, f"{kind} is blank"  # real images, not zeros

    series = [pydicom.dcmread(io.BytesIO(data)) for _, data in inputs["dicom-series"].files]
    assert len({ds.SOPInstanceUID for ds in series}) == len(series) == 8
    assert len({ds.SeriesInstanceUID for ds in series}) == 1
    z = sorted(float(ds.ImagePositionPatient[2]) for ds in series)
    assert np.allclose(np.diff(z), 5.0)  # one slab, 5 mm apart, as the service's sort expects
    volume = decode(list(inputs["dicom-series"].files), LimitSettings())
    assert volume.spacing is not None and volume.spacing[0] == pytest.approx(5.0)
    assert volume.modality == "CT" and inputs["dicom-mr"].files[0][0] == "MR_small.dcm"

    name, data = inputs["nifti-mni"].files[0]
    image = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    assert name.endswith(".nii.gz") and image.shape[2] == 8
    assert np.allclose(np.diag(image.affine)[:3], 1.0)  # the template's 1 mm grid, origin moved to the slab
    assert inputs["png-camera"].files[0][1].startswith(b"\x89PNG")


def samples(values: list[float], step_s: float = 10.0, per_sample: int = 20) -> list[Sample]:
    return [Sample(i * step_s, i * per_sample, {"p": v}) for i, v in enumerate(values)]


def test_the_growth_rule() -> None:
    rng = np.random.default_rng(0)
    flat = list(500 + rng.normal(0, 0.3, 60))
    leak = list(500 + np.arange(60) * 0.2 + rng.normal(0, 0.3, 60))  # 0.2 MB per 10 s: 72 MB/h
    spike = [*flat[:-1], 650.0]  # one large answer being written as the last sample is taken
    assert judge(samples(flat), "p", 0, 2.0, 1.0)["growing"] is False
    leaking = judge(samples(leak), "p", 0, 2.0, 1.0)
    assert leaking["growing"] is True
    assert leaking["slope_mb_per_h"] == pytest.approx(72, rel=0.1)
    assert leaking["slope_mb_per_1000_requests"] == pytest.approx(10, rel=0.1)  # 0.2 MB per 20 requests
    assert judge(samples(spike), "p", 0, 2.0, 1.0)["growing"] is False  # slope up, medians not
    warm = judge(samples([*np.linspace(300, 500, 20), *flat]), "p", 200, 2.0, 1.0)
    assert warm["growing"] is False and warm["samples_in_warmup"] == 20  # the warm-up's climb is discarded
    assert judge(samples(leak[:4]), "p", 0, 2.0, 1.0)["growing"] is None  # too few to fit


async def run(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """A subprocess awaited without blocking this loop, which serves the requests it sends."""
    process = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        out, _ = await process.communicate()
        return -1, out.decode(errors="replace")
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


def stats(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_locust_and_soak_against_a_live_service(
    redis_url: str, queue_settings: QueueSettings, exported: Path, tmp_path: Path
) -> None:
    key = new_key()  # the service as deployed: authentication on, the load tools send the key
    settings = make_settings(redis_url, queue_settings, exported).model_copy(
        update={"grpc_port": free_port(), "api_keys": entry_for("load", key)}
    )
    target = f"127.0.0.1:{settings.grpc_port}"
    # No C2P_* names: locust and soak.py do not need them, and a service started from such an env would refuse them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("C2P_")}
    env["LOAD_GRPC_TARGET"] = target  # the locustfile's default gRPC target (no --grpc-host below)
    env["LOAD_API_KEY"] = key
    prefix = tmp_path / "run"
    report = tmp_path / "soak.json"
    locust = [
        *("locust", "-f", "loadtests/locustfile.py", "--headless", "-u", "2", "-r", "2"),
        *("-t", f"{LOCUST_SECONDS}s", "--stop-timeout", "20", "--csv", str(prefix), "--exit-code-on-error", "1"),
        *("--only-summary", "--loglevel", "WARNING", "RestUser", "GrpcUser"),
    ]
    soak = [
        *(sys.executable, "loadtests/soak.py", "--minutes", str(SOAK_MINUTES), "--concurrency", "2"),
        *("--grpc-target", target, "--pid", f"service={os.getpid()}", "--json", str(report)),
    ]
    results: dict[str, tuple[int, str]] = {}

    async def scenario() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        server = build_server(settings, client, Metrics())
        await server.start()
        try:
            async with serving_http(settings, engine_for(exported)) as base:
                results["locust"] = await run([*locust, "--host", base], env, 120)
                results["soak"] = await run([*soak, "--host", base], env, 120)
        finally:
            await stop_server(server, 0)
            await client.aclose()

    asyncio.run(scenario())

    code, output = results["locust"]
    assert code == 0, output[-4000:]
    rows = stats(Path(f"{prefix}_stats.csv"))
    by_name = {row["Name"]: row for row in rows}
    rest = [r for r in rows if r["Name"].startswith("POST /v1/segmentations [")]
    grpc = [r for r in rows if r["Type"] == "grpc" and r["Name"].startswith("Segment [")]
    assert sum(int(r["Request Count"]) for r in rest) > 0, rows
    assert sum(int(r["Request Count"]) for r in grpc) > 0, rows
    assert {r["Name"].split("[")[1].rstrip("]") for r in rest + grpc} <= set(WEIGHTS)  # named by input kind
    assert by_name["Aggregated"]["Failure Count"] == "0", output[-4000:]
    assert stats(Path(f"{prefix}_failures.csv")) == []

    code, output = results["soak"]
    assert code == 0, output[-4000:]
    soaked: dict[str, Any] = json.loads(report.read_text())
    requests = soaked["requests"]
    assert soaked["mode"] == "attached" and requests["sent"] > 0
    assert requests["failed"] == 0 and requests["succeeded"] == requests["sent"], requests["errors"]
    for api in ("rest", "grpc"):
        figures = soaked["latency_after_warmup"][api]
        assert figures["count"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"], figures
    process = soaked["processes"]["service"]
    assert process["judged"] is True and process["samples"] >= 6
    assert 0 < process["rss_start_mb"] <= process["rss_max_mb"] and process["rss_end_mb"] <= process["rss_max_mb"]
    assert math.isfinite(process["slope_mb_per_h"]) and process["growing"] in (True, False)
    assert soaked["growing"] == process["growing"] and "median of the last third" in soaked["rule"]


@pytest.mark.slow
def test_the_chaos_drill_loses_nothing_and_answers_nothing_twice(exported: Path, tmp_path: Path) -> None:
    """loadtests/drill.py small: its own Redis, gateway and two workers, one worker SIGKILLed and one Redis restart
    while 20 jobs run; the JSON has its fields, every job ended, none was lost or answered twice."""
    import subprocess

    from service.queue.redis_server import RedisStartError, find_redis_server

    try:
        find_redis_server()
    except RedisStartError as err:
        pytest.skip(f"the drill restarts a redis-server of its own: {err}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("C2P_")}
    report = tmp_path / "drill.json"
    command = [
        *(sys.executable, "loadtests/drill.py", "--model", str(exported), "--jobs", "20", "--clients", "4"),
        *("--worker-kills", "1", "--redis-restarts", "1", "--redis-down-s", "1", "--lease-s", "2"),
        *("--deadline-s", "90", "--json", str(report)),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    drilled: dict[str, Any] = json.loads(report.read_text())
    assert json.loads(done.stdout) == drilled  # the one JSON object on stdout, also written to --json
    jobs = drilled["jobs"]
    assert jobs["sent"] == 20 and jobs["accepted"] + sum(jobs["not_accepted"].values()) == 20
    assert jobs["lost"] == 0 and jobs["duplicated"] == 0, drilled
    assert jobs["succeeded"] + sum(jobs["failed"].values()) == jobs["accepted"] > 0
    assert drilled["exited"] == [] and drilled["shutdown_codes"] == [0, 0, 0]
    events = [event["event"] for event in drilled["chaos"]]
    assert events == ["worker_killed", "worker_started", "redis_stopped", "redis_started"], drilled["chaos"]
    assert all(a["t_s"] <= b["t_s"] for a, b in zip(drilled["chaos"], drilled["chaos"][1:], strict=False))
    assert set(drilled["retries"]) == {"submit", "submit_by_reason", "poll", "poll_by_reason"}
    assert 0 < drilled["latency_ms"]["p50"] <= drilled["latency_ms"]["p99"]
    assert drilled["parameters"]["variant"] == "c2p-test-64" and drilled["parameters"]["worker_kills"] == 1
    (resumed,) = drilled["kill_resumed_s"]  # the killed worker's jobs ran again on the other one
    assert resumed is not None and drilled["kills_resumed_within_30_s"], drilled["kill_resumed_s"]


def test_the_upload_memory_benchmark_reports_each_case() -> None:
    """loadtests/bench_upload_memory.py small (20 slices): every case admitted, the fields there; the ratio it
    measures is asserted only where it means something, for 150 MB (docs/loadtest.md)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("C2P_")}
    command = [sys.executable, "loadtests/bench_upload_memory.py", "--slices", "20"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    report = json.loads(done.stdout)
    assert set(report["cases"]) == {"nifti_rest", "dicom_series_rest", "dicom_series_stow"}
    for case in report["cases"].values():
        assert case["status"] in (200, 202) and case["upload_mb"] > 9, case
        assert case["rss_peak_mb"] >= case["rss_before_mb"] and case["rss_growth_over_upload"] >= 0
    assert report["goal"] == 0.3 and isinstance(report["meets_goal"], bool)
