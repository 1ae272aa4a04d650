"""Soak test: a steady load for minutes while the gateway's and the worker's memory is sampled; does it grow?

    python loadtests/soak.py [--minutes 10] [--concurrency 4] [--model c2p-femto-192]
    python loadtests/soak.py --host http://127.0.0.1:8000 --grpc-target 127.0.0.1:8001 --pid serve=12345
    (a service with authentication on: export LOAD_API_KEY=<key> first; locust reads it too)

By default it starts the service itself, as ``loadtests/bench_e2e.py`` does: a private Redis
(``service.queue.redis_server.PrivateRedis``), ``c2p gateway`` and ``c2p worker`` as separate processes on loopback, so
each one's memory is its own. With ``--host`` it attaches to a running service instead and samples the processes
named by ``--pid NAME=PID`` (``c2p serve`` is one process holding gateway and worker; its private Redis is a child
and is counted with it).

The load is closed-loop at a small fixed concurrency: ``--concurrency`` clients, half on REST (multipart upload with
``?wait=``, and after every tenth success the NIfTI and PNG result formats of that job) and half on c2p.v1 gRPC
(``Segment`` with ``wait_seconds`` and a deadline), each sending real inputs from ``loadtests/inputs.py`` in the
same mix as the locustfile, back to back, until ``--minutes`` have passed. Every ``--interval`` seconds the resident
set (RSS) of each sampled process plus all its children is read with psutil.

Whether memory grows, per process, from the samples after the warm-up (``--warmup``, default a fifth of the run,
at most two minutes: caches, allocator arenas and ONNX Runtime's buffers fill during the first requests):

- ``slope_mb_per_h``: the least-squares line (numpy.polyfit) through RSS against time; ``slope_mb_per_1000_requests``
  the same against the number of requests finished by then (a leak per request shows as a constant there, whatever
  the rate);
- the process is ``growing`` when **both** the slope exceeds ``--growth-pct-per-hour`` (2 %) of its RSS at the start
  of the measured window per hour, **and** the median of the last third of the samples is above the median of the
  first third by more than ``--noise-mb`` (1 MB). Either test alone is fooled: the slope by one late spike (a large
  answer being serialised while the last sample is taken), a difference of the thirds by any small wobble. Medians
  rather than means, because one spike then moves neither; a true leak moves both. For a steady leak the
  medians lie two thirds of the measured window apart, so the floor means a 10-minute run (8 measured) flags
  leaks from about 11 MB/h, or 2 %/h of the RSS when that is more; run longer for smaller ones.
- A one-off step after the warm-up (a cache that fills once) also passes the rule; it shows as a slope that shrinks
  as the run gets longer, where a leak's does not.
- With fewer than 6 samples after the warm-up the verdict is ``null`` (not enough to fit a line).

``growing`` at the top is true when any sampled service process grows. The private Redis is sampled and reported
too, but not judged: it holds every job's result and kept outputs for ``--result-ttl-s`` and its record for that
plus the payload TTL (both set to ``--result-ttl-s``, default 60 s, in the started service, so records live 2
minutes and Redis levels off after about the default warm-up of a 10-minute run), which is growth by design; and
redis-server returns freed memory to the system slowly.

Exit status: 0; 3 with ``--fail-on-growth`` when the verdict is growing; 4 when a sampled process died during the
run (named in ``"exited"``).

Prints one JSON object: requests sent/succeeded/failed (with error codes), latency p50/p99 after the warm-up,
and per process: RSS start/end/max, slopes, the thirds' medians and the verdict. ``--minutes 0.5`` is a quick check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests.inputs import WEIGHTS, LoadInput, credentials, load_inputs  # noqa: E402

log = logging.getLogger("soak")

MIN_SAMPLES = 6
DEADLINE_MARGIN_S = 15.0
RESULT_EVERY = 10  # a REST client fetches the result formats after every tenth success
RESULT_FORMATS = ("nifti", "png")


# ------------------------------------------------------------------------------------------------- load


@dataclass
class Outcome:
    """One finished request: when it ended (seconds since the load began), on which API, and how it went."""

    end_s: float
    api: str
    kind: str
    ok: bool
    latency_ms: float
    error: str | None = None


@dataclass
class Load:
    """What the clients share: the outcomes so far and the signal to stop."""

    started: float = field(default_factory=time.perf_counter)
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def now(self) -> float:
        return time.perf_counter() - self.started

    def record(self, api: str, kind: str, start: float, error: str | None) -> None:
        latency_ms = (time.perf_counter() - start) * 1000
        self.outcomes.append(Outcome(self.now(), api, kind, error is None, latency_ms, error))


def weighted_kinds(seed: int) -> Iterator[str]:
    """An endless stream of input kinds in the locustfile's mix, reproducible per client."""
    rng = random.Random(seed)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    while True:
        yield rng.choices(kinds, weights)[0]


async def rest_client(load: Load, base: str, inputs: dict[str, LoadInput], wait_s: float, seed: int) -> None:
    headers = dict(credentials())
    async with httpx.AsyncClient(base_url=base, timeout=wait_s + DEADLINE_MARGIN_S, headers=headers) as http:
        successes = 0
        for kind in weighted_kinds(seed):
            if load.stop.is_set():
                return
            item = inputs[kind]
            files = [("file", (name, data, item.content_type)) for name, data in item.files]
            params: dict[str, Any] = {"wait": wait_s, **({"modality": item.modality} if item.modality else {})}
            start = time.perf_counter()
            error: str | None = None
            job_id = None
            try:
                response = await http.post("/v1/segmentations", params=params, files=files)
                error, job_id = rest_outcome(response, item)
            except httpx.HTTPError as err:
                error = f"transport: {type(err).__name__}"
            load.record("rest", kind, start, error)
            if error is None:
                successes += 1
                if job_id and successes % RESULT_EVERY == 0:
                    await fetch_results(load, http, job_id)


def rest_outcome(response: httpx.Response, item: LoadInput) -> tuple[str | None, str | None]:
    """(error code or None, job id): a success is a 200 whose job succeeded with the input's shape."""
    if response.status_code != 200:
        try:
            return str(response.json()["code"]), None
        except Exception:
            return f"http_{response.status_code}", None
    job = response.json()
    if job.get("status") != "succeeded":
        return f"not_{job.get('status')}", None
    if tuple(job["result"]["input"]["shape"]) != item.shape:
        return "wrong_shape", None
    return None, job["id"]


async def fetch_results(load: Load, http: httpx.AsyncClient, job_id: str) -> None:
    """The derived formats: made by the gateway on request, so a leak there is the gateway's, not the worker's."""
    for fmt in RESULT_FORMATS:
        start = time.perf_counter()
        try:
            response = await http.get(f"/v1/segmentations/{job_id}/result", params={"format": fmt})
            error = None if response.status_code == 200 else f"http_{response.status_code}"
        except httpx.HTTPError as err:
            error = f"transport: {type(err).__name__}"
        load.record("rest", f"result:{fmt}", start, error)


async def grpc_client(load: Load, target: str, inputs: dict[str, LoadInput], wait_s: float, seed: int) -> None:
    import grpc

    from service.grpc import segmentation_pb2, segmentation_pb2_grpc

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = segmentation_pb2_grpc.SegmentationStub(channel)
        for kind in weighted_kinds(seed):
            if load.stop.is_set():
                return
            item = inputs[kind]
            request = segmentation_pb2.SegmentRequest(
                files=[segmentation_pb2.File(name=name, data=data) for name, data in item.files],
                wait_seconds=wait_s,
                **({"modality": item.modality} if item.modality else {}),
            )
            start = time.perf_counter()
            error: str | None = None
            try:
                job = await stub.Segment(request, timeout=wait_s + DEADLINE_MARGIN_S, metadata=credentials())
                if job.status != "succeeded":
                    error = f"not_{job.status}"
                elif tuple(job.result.input.shape) != item.shape:
                    error = "wrong_shape"
            except grpc.aio.AioRpcError as err:
                trailers = dict(err.trailing_metadata() or ())
                error = str(trailers.get("c2p-error-code") or err.code().name.lower())
            load.record("grpc", kind, start, error)


# ------------------------------------------------------------------------------------------------- memory


@dataclass
class Sample:
    t_s: float
    finished: int  # requests finished by then
    rss_mb: dict[str, float]


def tree_rss_mb(process: psutil.Process) -> float:
    """RSS of a process and all its descendants (a child that exits between listing and reading counts as 0)."""
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += child.memory_info().rss
    return total / 2**20


async def sample_memory(
    load: Load, processes: dict[str, psutil.Process], interval_s: float, exited: list[str]
) -> list[Sample]:
    """Samples until the load stops. A sampled process that dies ends the run and is named in ``exited``: a
    service that falls over under a steady load is the soak's worst finding, not an error of the soak."""
    samples: list[Sample] = []
    while True:
        rss: dict[str, float] = {}
        for name, process in processes.items():
            try:
                rss[name] = tree_rss_mb(process)
            except psutil.NoSuchProcess:
                log.error("%s (pid %d) exited during the soak", name, process.pid)
                exited.append(name)
        if exited:
            load.stop.set()
            return samples
        samples.append(Sample(load.now(), len(load.outcomes), rss))
        if load.stop.is_set():
            return samples
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(load.stop.wait(), interval_s)


def judge(
    samples: list[Sample], name: str, warmup_s: float, growth_pct_per_hour: float, noise_mb: float
) -> dict[str, Any]:
    """One process's figures and verdict, by the rule in the module docstring."""
    everything = [s.rss_mb[name] for s in samples]
    if not everything:
        return {"samples": 0, "growing": None, "why": "no samples"}
    kept = [s for s in samples if s.t_s >= warmup_s]
    out: dict[str, Any] = {
        "samples": len(kept),
        "samples_in_warmup": len(samples) - len(kept),
        "rss_before_load_mb": round(everything[0], 1),  # the first sample is taken as the load starts
        "rss_max_overall_mb": round(max(everything), 1),
    }
    if not kept:
        return {**out, "growing": None, "why": "no samples after the warm-up"}
    rss = np.array([s.rss_mb[name] for s in kept])
    out.update(
        {
            "rss_start_mb": round(float(rss[0]), 1),
            "rss_end_mb": round(float(rss[-1]), 1),
            "rss_max_mb": round(float(rss.max()), 1),
        }
    )
    if len(kept) < MIN_SAMPLES:
        return {**out, "growing": None, "why": f"fewer than {MIN_SAMPLES} samples after the warm-up"}
    hours = (np.array([s.t_s for s in kept]) - kept[0].t_s) / 3600
    slope_h = float(np.polyfit(hours, rss, 1)[0])
    finished = np.array([s.finished for s in kept], dtype=float)
    slope_req = float(np.polyfit(finished, rss, 1)[0]) * 1000 if np.ptp(finished) > 0 else None
    third = len(kept) // 3
    first, last = float(np.median(rss[:third])), float(np.median(rss[-third:]))
    limit = growth_pct_per_hour / 100 * float(rss[0])
    growing = slope_h > limit and last - first > noise_mb
    return {
        **out,
        "slope_mb_per_h": round(slope_h, 2),
        "slope_mb_per_1000_requests": None if slope_req is None else round(slope_req, 3),
        "slope_limit_mb_per_h": round(limit, 2),
        "first_third_median_mb": round(first, 2),
        "last_third_median_mb": round(last, 2),
        "growing": bool(growing),
    }


# ------------------------------------------------------------------------------------------------- report


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def latency(outcomes: list[Outcome]) -> dict[str, Any]:
    times = [o.latency_ms for o in outcomes if o.ok]
    return {"count": len(times), "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99)}


def report(
    load: Load,
    samples: list[Sample],
    judged: dict[str, bool],
    args: argparse.Namespace,
    warmup_s: float,
    interval_s: float,
) -> dict[str, Any]:
    outcomes = load.outcomes
    measured = [o for o in outcomes if o.end_s >= warmup_s]
    span = (measured[-1].end_s - warmup_s) if measured else 0.0
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    processes = {}
    for name, judged_here in judged.items():
        figures = judge(samples, name, warmup_s, args.growth_pct_per_hour, args.noise_mb)
        processes[name] = {**figures, "judged": judged_here}
    verdicts = [p["growing"] for p in processes.values() if p["judged"]]
    growing = True if any(v is True for v in verdicts) else (False if verdicts and None not in verdicts else None)
    kinds = sorted({o.kind for o in outcomes})
    return {
        "mode": "attached" if args.host else "started",
        "minutes": args.minutes,
        "duration_s": round(load.now(), 1),
        "warmup_s": round(warmup_s, 1),
        "interval_s": round(interval_s, 2),
        "concurrency": args.concurrency,
        "requests": {
            "sent": len(outcomes),
            "succeeded": sum(o.ok for o in outcomes),
            "failed": sum(not o.ok for o in outcomes),
            "errors": errors,
            "after_warmup": len(measured),
            "per_s_after_warmup": round(len(measured) / span, 2) if span > 0 else None,
        },
        "latency_after_warmup": {
            "all": latency(measured),
            "rest": latency([o for o in measured if o.api == "rest" and not o.kind.startswith("result:")]),
            "grpc": latency([o for o in measured if o.api == "grpc"]),
            "by_kind": {
                f"{api}:{kind}": latency([o for o in measured if o.api == api and o.kind == kind])
                for api in ("rest", "grpc")
                for kind in kinds
                if any(o.api == api and o.kind == kind for o in measured)
            },
        },
        "processes": processes,
        "rule": (
            f"growing = slope > {args.growth_pct_per_hour:g}% of the start RSS per hour AND median of the last third "
            f"> median of the first third + {args.noise_mb:g} MB, on samples after the warm-up"
        ),
        "growing": growing,
    }


# ------------------------------------------------------------------------------------------------- service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base: str, processes: list[subprocess.Popen[bytes]], logs: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise SystemExit(f"a service process exited during start-up; logs in {logs}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise SystemExit(f"the service did not become ready in {timeout_s:g} s; logs in {logs}")


async def wait_grpc(target: str, timeout_s: float = 30) -> None:
    """The gateway serves REST and gRPC from one process, but they bind one after the other."""
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout_s)


EXPORT_FOLDER = """
import sys
from service.worker.artifacts import ensure_artifact
from service.config import load_settings
settings = load_settings(model=sys.argv[1] or None)
print(ensure_artifact(settings.model, settings.artifacts_dir, settings.engine.kind))
"""


def export_folder(model: str | None, env: dict[str, str]) -> str:
    """The export folder the service would make of ``model`` (exporting once, cached), resolved in a child process.

    Gateway and worker are then given the folder, as a deployment gives them one: given a variant name or a
    checkpoint, a worker imports torch to find or make the export and keeps hundreds of MB it never uses again,
    which would be measured as the worker's memory. A child process, so that this driver never imports torch.
    """
    if model and (Path(model) / "card.json").is_file():
        return model
    done = subprocess.run(
        [sys.executable, "-c", EXPORT_FOLDER, model or ""], env=env, cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"cannot resolve the model {model!r} to an export folder:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def started_service(args: argparse.Namespace) -> Iterator[tuple[str, str, dict[str, int], dict[str, bool]]]:
    """Private Redis + ``c2p gateway`` + ``c2p worker``: (base URL, gRPC target, pids by name, judged by name)."""
    from service.queue.redis_server import PrivateRedis

    with PrivateRedis(unix_socket=True) as redis, tempfile.TemporaryDirectory(prefix="c2p-soak-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("C2P_")}
        ttl = str(args.result_ttl_s)
        env.update(
            {
                "C2P_REDIS_URL": redis.url,
                "C2P_ENGINE__INTRA_OP_THREADS": str(args.threads),
                "C2P_QUEUE__RESULT_TTL_S": ttl,
                "C2P_QUEUE__PAYLOAD_TTL_S": ttl,
            }
        )
        port, grpc_port = free_port(), free_port()
        model = ["--model", export_folder(args.model, env)]
        command = [sys.executable, "-m", "service.cli"]
        logs = Path(tmp)
        processes: list[subprocess.Popen[bytes]] = []
        try:
            for name, extra in (("gateway", ["--port", str(port), "--grpc-port", str(grpc_port)]), ("worker", [])):
                with (logs / f"{name}.log").open("wb") as out:  # the child keeps its own descriptor
                    processes.append(
                        subprocess.Popen(
                            [*command, name, *extra, *model], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
                        )
                    )
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, processes, logs)
            pids = {"gateway": processes[0].pid, "worker": processes[1].pid}
            judged = {"gateway": True, "worker": True}
            if redis.pid is not None:
                pids["redis"] = redis.pid
                judged["redis"] = False
            yield base, f"127.0.0.1:{grpc_port}", pids, judged
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@contextlib.contextmanager
def attached_service(args: argparse.Namespace) -> Iterator[tuple[str, str, dict[str, int], dict[str, bool]]]:
    pids: dict[str, int] = {}
    for item in args.pid:
        name, _, pid = item.partition("=")
        if not name or not pid.isdigit():
            raise SystemExit(f"--pid wants NAME=PID, got {item!r}")
        pids[name] = int(pid)
    if not pids:
        raise SystemExit("--host needs at least one --pid NAME=PID to sample (e.g. --pid serve=12345)")
    target = args.grpc_target or f"{urlsplit(args.host).hostname or '127.0.0.1'}:8001"
    yield args.host.rstrip("/"), target, pids, dict.fromkeys(pids, True)


# ------------------------------------------------------------------------------------------------- main


async def soak(
    base: str, target: str, pids: dict[str, int], judged: dict[str, bool], args: argparse.Namespace
) -> dict[str, Any]:
    duration_s = args.minutes * 60
    interval_s = args.interval or min(10.0, max(0.5, duration_s / 60))
    warmup_s = args.warmup if args.warmup is not None else min(120.0, duration_s / 5)
    inputs = load_inputs()
    processes = {name: psutil.Process(pid) for name, pid in pids.items()}
    await wait_grpc(target)
    load = Load()
    clients = [
        rest_client(load, base, inputs, args.wait, seed=i)
        if i % 2 == 0
        else grpc_client(load, target, inputs, args.wait, seed=i)
        for i in range(args.concurrency)
    ]
    tasks = [asyncio.create_task(c) for c in clients]
    exited: list[str] = []
    sampler = asyncio.create_task(sample_memory(load, processes, interval_s, exited))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(load.stop.wait()), duration_s)  # set early if a process dies
    load.stop.set()
    done, pending = await asyncio.wait(tasks, timeout=args.wait + DEADLINE_MARGIN_S + 5)
    for task in pending:  # a client stuck past its own deadline: give up on it, the report says what finished
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    samples = await sampler
    result = report(load, samples, judged, args, warmup_s, interval_s)
    if exited:
        result["exited"] = exited
        result["growing"] = None  # unknown: the run ended early; "exited" is the finding
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load (default 10; 0.5 is quick)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients, half REST and half gRPC (default 4)")
    parser.add_argument("--interval", type=float, default=None, help="seconds between samples (default: run/60)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds discarded (default: run/5, <= 120)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds each request waits for its result")
    parser.add_argument("--growth-pct-per-hour", type=float, default=2.0, help="slope limit, %% of start RSS per h")
    parser.add_argument("--noise-mb", type=float, default=1.0, help="last third must exceed the first by this")
    parser.add_argument("--model", default=None, help="started service: variant, checkpoint or export folder")
    parser.add_argument("--threads", type=int, default=1, help="started service: ONNX Runtime intra-op threads")
    parser.add_argument("--result-ttl-s", type=int, default=60, help="started service: payload and result TTL")
    parser.add_argument("--host", default=None, help="attach to this running service (REST base URL)")
    parser.add_argument("--grpc-target", default=None, help="attached: gRPC HOST:PORT (default --host's host:8001)")
    parser.add_argument("--pid", action="append", default=[], help="attached: NAME=PID to sample (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    parser.add_argument("--fail-on-growth", action="store_true", help="exit 3 when the verdict is growing")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1:
        parser.error("--minutes must be > 0 and --concurrency >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    service = attached_service(args) if args.host else started_service(args)
    with service as (base, target, pids, judged):
        log.info("soaking %s and %s for %g min, pids %s", base, target, args.minutes, pids)
        result = asyncio.run(soak(base, target, pids, judged, args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if result.get("exited"):
        return 4
    return 3 if args.fail_on_growth and result["growing"] else 0


if __name__ == "__main__":
    sys.exit(main())
