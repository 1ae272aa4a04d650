"""Chaos drill: jobs under load while workers are SIGKILLed and Redis restarts; is anything lost or answered twice?

    python loadtests/drill.py [--jobs 500] [--clients 16] [--workers 2] [--worker-kills 3] [--redis-restarts 1]
                              [--model c2p-femto-192]

Bounded and on loopback. It starts a private ``redis-server`` with the append-only file on (a fixed port and its
own data dir, so it can be stopped and started again at the same address with its data, as a Redis StatefulSet
is), ``c2p gateway`` and ``--workers`` ``c2p worker`` processes, then ``--clients`` REST clients send ``--jobs``
small single-slice inputs (pydicom's CT and MR test slices, scikit-image's camera PNG and a generated PNG), each
``POST /v1/segmentations`` followed by polling ``GET /v1/segmentations/{id}`` until the job ends.

Chaos, spread evenly over the submissions: ``--worker-kills`` times a worker is SIGKILLed (the one holding the most
jobs, so the kill lands on work in flight) and a new one is started in its place; ``--redis-restarts`` times Redis
is stopped (SIGTERM: it flushes its append-only file), left down ``--redis-down-s`` and started again; gateway and
workers are never restarted for it. A submission waiting to be sent past an event's turn waits until the event
has begun, so even a tiny run has jobs in flight at every event.

The client retries a submission answered 429 or 503, or one whose connection failed, with capped exponential
back-off (Retry-After when given), and counts every retry. Polls that fail the same way are retried too.

Prints one JSON object: ``jobs`` (sent: submissions; accepted: answered 202 with a job id; succeeded; ``failed``
by error code; ``not_accepted`` by last reason; ``lost``: accepted but not ended when ``--deadline-s`` ran out,
target 0; ``duplicated``: jobs whose ending changed between two reads (another status, another result) or that
Redis announced as ended more than once, target 0; ``redelivered``: jobs a second worker ran after a kill or a
restart, expected; ``orphaned``: jobs in Redis no client was told about, from a submission whose answer was lost),
``retries``, ``latency_ms`` (first attempt to the end seen, succeeded jobs), ``kill_resumed_s`` (per kill, seconds
until every job the killed worker held ran on another worker or ended; target <= 30 at the shipped clocks, which
the drill runs with unless ``--lease-s`` shortens them), ``chaos`` (each event with seconds since the load began),
``exited`` (service processes that died without being killed: target none) and the
parameters. Exit status 0, or 1 when anything was lost, duplicated, or a service process died on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests.inputs import Upload, camera_png, single_dicom  # noqa: E402
from loadtests.soak import export_folder, free_port  # noqa: E402
from service.queue.redis_server import _parent_death_signal, find_redis_server  # noqa: E402

TERMINAL = ("succeeded", "failed")
RETRIED_STATUS = (429, 503)
PING = b"*1\r\n$4\r\nPING\r\n"


# ------------------------------------------------------------------------------------------------- redis


class DurableRedis:
    """A redis-server on a fixed loopback port with its append-only file in ``directory``: stop() and start() again
    bring it back at the same address with its data, as a Redis pod with a persistent volume comes back.

    (``service.queue.redis_server.PrivateRedis`` picks a new temp dir and port at every start, which is what the
    embedded mode wants and a restart drill does not.)
    """

    def __init__(self, directory: Path, *, fsync: str = "everysec", port: int | None = None) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.port = port or free_port()
        self.binary = find_redis_server()  # RedisStartError when there is none
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start (or start again) and return once it answers PING with its data loaded."""
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    "protected-mode yes",
                    f"port {self.port}",
                    "daemonize no",
                    'logfile ""',
                    "loglevel warning",
                    f'dir "{self.directory.resolve()}"',
                    "appendonly yes",
                    f"appendfsync {self.fsync}",
                    'save ""',
                ]
            )
            + "\n"
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,  # a Ctrl-C for the driver must not stop Redis under the service
                preexec_fn=_parent_death_signal(),  # and a driver that dies takes it along
            )
        deadline = time.monotonic() + timeout_s
        while not self._ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"redis-server did not answer PING within {timeout_s:g} s: {self._log_tail()}")
            time.sleep(0.02)

    def _ping(self) -> bool:
        """+PONG only: -LOADING (the append-only file being replayed) is not ready yet."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(PING)
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        """SIGTERM: Redis fsyncs its append-only file and exits; SIGKILL: a crash (or after ``timeout_s``)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> DurableRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------- service


def service_env(redis_url: str, **settings: str) -> dict[str, str]:
    """The parent's environment without its C2P_* names (the service refuses unknown ones), plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("C2P_")}
    env["C2P_REDIS_URL"] = redis_url
    env.update(settings)
    return env


def spawn(command: str, model: str, env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``c2p gateway|worker`` as a child process, its output appended to ``log``."""
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", command, *extra, "--model", model],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def consumer_of(process: subprocess.Popen[bytes]) -> str:
    """The consumer name a worker process reads the stream under (service.worker.consumer.consumer_name)."""
    return f"{socket.gethostname()}-{process.pid}"


def end(processes: list[subprocess.Popen[bytes]], timeout_s: float = 60.0) -> list[int | None]:
    """SIGTERM all, then wait for each (SIGKILL past ``timeout_s``); their exit codes."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout_s))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            codes.append(None)
    return codes


async def wait_ready(base: str, workers: int, processes: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """Until readiness counts ``workers`` warm workers."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            if any(p.poll() is not None for p in processes):
                raise RuntimeError("a service process exited during start-up")
            with contextlib.suppress(httpx.TransportError):
                answer = await http.get(f"{base}/v2/health/ready")
                if answer.status_code == 200 and answer.json().get("workers", 0) >= workers:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service was not ready with {workers} workers within {timeout_s:g} s")
            await asyncio.sleep(0.2)


# ------------------------------------------------------------------------------------------------- load


def generated_png(size: int = 256, seed: int = 0) -> Upload:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(60, 12, (size, size))
    image[(yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 6) ** 2] += 110
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return "blob.png", buffer.getvalue()


def drill_inputs() -> list[tuple[Upload, str]]:
    """Small single-slice inputs, with each part's content type."""
    return [
        (single_dicom("CT_small.dcm"), "application/dicom"),
        (generated_png(), "image/png"),
        (single_dicom("MR_small.dcm"), "application/dicom"),
        (camera_png(), "image/png"),
    ]


@dataclass
class Submission:
    index: int
    started: float  # seconds since the load began, first attempt
    job_id: str | None = None
    status: str | None = None  # the first terminal status seen
    error_code: str | None = None
    fingerprint: str | None = None  # of the first terminal answer
    ended: float | None = None
    not_accepted: str | None = None  # why no job id came back


@dataclass
class Run:
    args: argparse.Namespace
    base: str
    inputs: list[tuple[Upload, str]]
    started: float = field(default_factory=time.monotonic)
    next_index: int = 0
    resolved: int = 0  # submissions accepted or given up
    submissions: list[Submission] = field(default_factory=list)
    retries: Counter[str] = field(default_factory=Counter)
    poll_retries: Counter[str] = field(default_factory=Counter)
    # Events in the order they fire, with the submission index at which each fires and a flag once it began.
    turns: list[int] = field(default_factory=list)
    begun: list[asyncio.Event] = field(default_factory=list)
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    # Per kill: seconds until every job the killed worker held ran again on another worker (or ended); None: never.
    resumptions: list[asyncio.Task] = field(default_factory=list)

    def now(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started > self.args.deadline_s


def fingerprint(job: dict[str, Any]) -> str:
    """What a caller would act on: the status and the result (or error) as stored."""
    kept = {"status": job.get("status"), "result": job.get("result"), "error": job.get("error")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def backoff_s(attempt: int, retry_after: str | None) -> float:
    if retry_after and retry_after.isdigit():
        return min(float(retry_after), 5.0)
    return min(0.05 * 2**attempt, 2.0) * random.uniform(0.5, 1.0)


async def submit(run: Run, http: httpx.AsyncClient, sub: Submission) -> None:
    """POST until a job id comes back, retrying 429/503/connection errors; sets job_id or not_accepted."""
    (name, data), content_type = run.inputs[sub.index % len(run.inputs)]
    # Each submission its own upload (by name); its retries the same one, which the gateway answers with the job
    # the first attempt made when that attempt's answer was lost (C2P_QUEUE__DEDUPE_WINDOW_S).
    name = f"{sub.index:05d}-{name}"
    attempt = 0
    while True:
        if run.out_of_time():
            sub.not_accepted = sub.not_accepted or "deadline"
            return
        reason: str
        retry_after = None
        try:
            answer = await http.post(f"{run.base}/v1/segmentations", files=[("file", (name, data, content_type))])
        except httpx.TransportError as err:
            reason = f"connection:{type(err).__name__}"
        else:
            if answer.status_code in (200, 202):
                sub.job_id = answer.json()["id"]
                return
            code = _code(answer)
            if answer.status_code not in RETRIED_STATUS:
                sub.not_accepted = code
                return
            reason, retry_after = code, answer.headers.get("retry-after")
        run.retries[reason] += 1
        sub.not_accepted = reason
        await asyncio.sleep(backoff_s(attempt, retry_after))
        attempt += 1


def _code(answer: httpx.Response) -> str:
    try:
        return str(answer.json().get("code") or f"http_{answer.status_code}")
    except ValueError:
        return f"http_{answer.status_code}"


async def follow(run: Run, http: httpx.AsyncClient, sub: Submission) -> None:
    """Poll the job until it ends (or the run's deadline), retrying polls that fail for an outage."""
    delay = 0.05
    while not run.out_of_time():
        try:
            answer = await http.get(f"{run.base}/v1/segmentations/{sub.job_id}")
        except httpx.TransportError as err:
            run.poll_retries[f"connection:{type(err).__name__}"] += 1
        else:
            if answer.status_code == 200:
                job = answer.json()
                if job["status"] in TERMINAL:
                    sub.status, sub.ended, sub.fingerprint = job["status"], run.now(), fingerprint(job)
                    if job.get("error"):
                        sub.error_code = job["error"]["code"]
                    return
            elif answer.status_code in RETRIED_STATUS:
                run.poll_retries[_code(answer)] += 1
            else:  # 404: the accepted job is gone; that is a loss, not a retry
                sub.status, sub.error_code, sub.ended = "vanished", _code(answer), run.now()
                return
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.25)


async def client(run: Run, http: httpx.AsyncClient) -> None:
    while run.next_index < run.args.jobs:
        index = run.next_index
        run.next_index += 1
        for turn, begun in zip(run.turns, run.begun, strict=True):  # a chaos event's turn: wait for it to begin
            if index >= turn:
                await begun.wait()
        sub = Submission(index, run.now())
        run.submissions.append(sub)
        await submit(run, http, sub)
        if sub.job_id is not None:
            sub.not_accepted = None
        async with run.progress:
            run.resolved += 1
            run.progress.notify_all()
        if sub.job_id is not None:
            await follow(run, http, sub)


# ------------------------------------------------------------------------------------------------- chaos


@dataclass
class Fleet:
    """The service's processes: what the chaos acts on and what must not die on its own."""

    model: str
    env: dict[str, str]
    logs: Path
    base: str
    grpc_port: int
    gateway: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started_workers: int = 0

    def start_gateway(self) -> None:
        ports = ["--port", self.base.rsplit(":", 1)[1], "--grpc-port", str(self.grpc_port)]
        self.gateway = spawn("gateway", self.model, self.env, self.logs / "gateway.log", *ports)

    def start_worker(self) -> subprocess.Popen[bytes]:
        self.started_workers += 1
        worker = spawn("worker", self.model, self.env, self.logs / f"worker-{self.started_workers}.log")
        self.workers.append(worker)
        return worker

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in [self.gateway, *self.workers] if p is not None]

    def exited(self) -> list[dict[str, Any]]:
        return [
            {"pid": p.pid, "code": p.returncode, "what": "gateway" if p is self.gateway else "worker"}
            for p in self.processes()
            if p.poll() is not None
        ]


def plan(kills: int, restarts: int) -> list[str]:
    """Kinds of events in firing order, each kind spread evenly (a restart between kills, not after them all)."""
    spots = [((i + 0.5) / kills, 0, "worker_kill") for i in range(kills)]
    spots += [((i + 0.5) / restarts, 1, "redis_restart") for i in range(restarts)]
    return [kind for _, _, kind in sorted(spots)]


async def pending_by_consumer(redis_url: str, prefix: str) -> dict[str, int]:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    client = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        pending: dict[str, int] = {}
        async for stream in client.scan_iter(match=f"{prefix}:jobs:*", count=100):  # one stream per model
            summary = await client.xpending(stream, f"{prefix}:workers")
            for c in summary.get("consumers") or []:
                pending[_text(c["name"])] = pending.get(_text(c["name"]), 0) + int(c["pending"])
        return pending
    except (RedisError, OSError):
        return {}
    finally:
        await client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def held_jobs(redis_url: str, prefix: str, consumer: str) -> list[str]:
    """The job ids of the entries ``consumer`` holds (delivered, not acknowledged) in every model's stream."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    client = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    jobs: list[str] = []
    try:
        async for stream in client.scan_iter(match=f"{prefix}:jobs:*", count=100):
            held = await client.xpending_range(stream, f"{prefix}:workers", "-", "+", 1000, consumername=consumer)
            for entry in held:
                for _, fields in await client.xrange(stream, entry["message_id"], entry["message_id"]):
                    if b"job_id" in fields:
                        jobs.append(_text(fields[b"job_id"]))
    except (RedisError, OSError):
        pass
    finally:
        await client.aclose()
    return jobs


async def resumed_after(
    redis_url: str, prefix: str, jobs: list[str], gone: str, since: float, limit_s: float
) -> float | None:
    """Seconds from ``since`` (the kill) until each of ``jobs`` runs on another worker than ``gone`` or has ended;
    None when some had not within ``limit_s``. Redis restarts in between are waited out."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    client = aioredis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    waiting = set(jobs)
    try:
        while waiting and time.monotonic() - since < limit_s:
            for job in list(waiting):
                try:
                    status, consumer = await client.hmget(f"{prefix}:job:{job}", ["status", "consumer"])
                except (RedisError, OSError):
                    break
                ended = status is None or _text(status) in TERMINAL
                elsewhere = status is not None and _text(status) == "running" and consumer and _text(consumer) != gone
                if ended or elsewhere:
                    waiting.discard(job)
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()
    return None if waiting else round(time.monotonic() - since, 2)


async def chaos(run: Run, fleet: Fleet, redis: DurableRedis, kinds: list[str], events: list[dict[str, Any]]) -> None:
    args = run.args
    for kind, turn, begun in zip(kinds, run.turns, run.begun, strict=True):
        async with run.progress:  # its turn: the submissions before it are in (or given up)
            await run.progress.wait_for(lambda turn=turn: run.resolved >= turn or run.out_of_time())
        if kind == "worker_kill":
            pending = await pending_by_consumer(redis.url, args.prefix)
            live = [w for w in fleet.workers if w.poll() is None]
            if not live:  # every worker died on its own: reported under "exited"
                events.append({"t_s": run.now(), "event": "no_worker_to_kill"})
                begun.set()
                continue
            victim = max(live, key=lambda w: pending.get(consumer_of(w), 0))
            held = await held_jobs(redis.url, args.prefix, consumer_of(victim))
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            resumed = resumed_after(redis.url, args.prefix, held, consumer_of(victim), killed_at, args.deadline_s)
            run.resumptions.append(asyncio.create_task(resumed))
            await asyncio.to_thread(victim.wait)
            fleet.workers.remove(victim)
            fleet.killed.append(victim)
            events.append(
                {"t_s": run.now(), "event": "worker_killed", "pid": victim.pid,
                 "jobs_held": pending.get(consumer_of(victim), 0)}
            )  # fmt: skip
            begun.set()
            await asyncio.sleep(args.restart_delay_s)
            worker = fleet.start_worker()
            events.append({"t_s": run.now(), "event": "worker_started", "pid": worker.pid})
        else:
            pending = await pending_by_consumer(redis.url, args.prefix)
            await asyncio.to_thread(redis.stop, signal.SIGTERM)
            events.append({"t_s": run.now(), "event": "redis_stopped", "jobs_held": sum(pending.values())})
            begun.set()
            await asyncio.sleep(args.redis_down_s)
            await asyncio.to_thread(redis.start)
            events.append({"t_s": run.now(), "event": "redis_started"})


async def count_endings(redis_url: str, prefix: str, counts: Counter[str], stop: asyncio.Event) -> None:
    """Every 'succeeded'/'failed' Redis publishes for a job (a job that ends twice would be told twice)."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    channel_prefix = f"{prefix}:done:".encode()
    while not stop.is_set():
        client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.psubscribe(f"{prefix}:done:*")
            while not stop.is_set():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                if message and message.get("data") in (b"succeeded", b"failed"):
                    counts[message["channel"][len(channel_prefix) :].decode()] += 1
        except (RedisError, OSError):
            # Redis is restarting: subscribe again (an ending meanwhile is missed, never counted twice).
            await asyncio.sleep(0.1)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
            await client.aclose()


# ------------------------------------------------------------------------------------------------- the drill


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


async def recheck(run: Run, http: httpx.AsyncClient, subs: list[Submission]) -> tuple[list[str], int]:
    """Read every ended job again: one whose status or result changed was answered twice. Also how many ran more
    than once (a worker killed under it, or Redis restarted while it ran): expected, and not a duplicate answer."""
    changed, redelivered = [], 0
    for sub in subs:
        for attempt in range(20):
            try:
                answer = await http.get(f"{run.base}/v1/segmentations/{sub.job_id}")
            except httpx.TransportError:
                await asyncio.sleep(backoff_s(attempt, None))
                continue
            if answer.status_code in RETRIED_STATUS:
                await asyncio.sleep(backoff_s(attempt, None))
                continue
            if answer.status_code != 200 or fingerprint(answer.json()) != sub.fingerprint:
                changed.append(sub.job_id)
            elif answer.json().get("deliveries", 0) > 1:
                redelivered += 1
            break
        else:
            changed.append(sub.job_id)  # unreadable for 20 tries: cannot vouch for it
    return changed, redelivered


async def job_ids_in_redis(redis_url: str, prefix: str) -> set[str]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        start = len(prefix) + len(":job:")
        return {_text(key)[start:] async for key in client.scan_iter(match=f"{prefix}:job:*", count=1000)}
    finally:
        await client.aclose()


async def drill(args: argparse.Namespace, fleet: Fleet, redis: DurableRedis) -> dict[str, Any]:
    kinds = plan(args.worker_kills, args.redis_restarts)
    run = Run(args, fleet.base, drill_inputs())
    run.turns = [max(1, round(args.jobs * (k + 1) / (len(kinds) + 1))) for k in range(len(kinds))]
    run.begun = [asyncio.Event() for _ in kinds]
    events: list[dict[str, Any]] = []
    endings: Counter[str] = Counter()
    stop_counting = asyncio.Event()
    counter = asyncio.create_task(count_endings(redis.url, args.prefix, endings, stop_counting))
    await asyncio.sleep(0.2)  # subscribed before the first job can end
    limits = httpx.Limits(max_connections=args.clients * 2, max_keepalive_connections=args.clients * 2)
    timeout = httpx.Timeout(30.0, connect=5.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        run.started = time.monotonic()
        chaos_task = asyncio.create_task(chaos(run, fleet, redis, kinds, events))
        await asyncio.gather(*(client(run, http) for _ in range(args.clients)))
        load_s = run.now()
        await chaos_task  # every event has begun; a restart still under way completes here
        ended = [s for s in run.submissions if s.status in TERMINAL]
        changed, redelivered = await recheck(run, http, ended)
        resumed = list(await asyncio.gather(*run.resumptions))
    await asyncio.sleep(1.0)  # the last endings' messages
    stop_counting.set()
    await counter
    accepted = [s for s in run.submissions if s.job_id is not None]
    told_twice = sorted(job for job, n in endings.items() if n > 1)
    known = {s.job_id for s in accepted}
    orphaned = sorted((await job_ids_in_redis(redis.url, args.prefix)) - known)
    latencies = [(s.ended - s.started) * 1000 for s in ended if s.status == "succeeded" and s.ended is not None]
    failed = Counter(s.error_code or "unknown" for s in ended if s.status == "failed")
    failed.update(f"vanished:{s.error_code}" for s in accepted if s.status == "vanished")
    lost = [s.job_id for s in accepted if s.status is None]
    duplicated = sorted(set(changed) | set(told_twice))
    return {
        "jobs": {
            "sent": len(run.submissions),
            "accepted": len(accepted),
            "succeeded": sum(s.status == "succeeded" for s in ended),
            "failed": dict(failed),
            "not_accepted": dict(Counter(s.not_accepted for s in run.submissions if s.job_id is None)),
            "lost": len(lost) + sum(s.status == "vanished" for s in accepted),
            "duplicated": len(duplicated),
            "redelivered": redelivered,
            "orphaned": len(orphaned),
        },
        "retries": {
            "submit": sum(run.retries.values()),
            "submit_by_reason": dict(run.retries),
            "poll": sum(run.poll_retries.values()),
            "poll_by_reason": dict(run.poll_retries),
        },
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": percentile(latencies, 100),
        },
        # per kill, seconds until every job the killed worker held ran on another worker (None: some never did)
        "kill_resumed_s": resumed,
        "kills_resumed_within_30_s": all(r is not None and r <= 30 for r in resumed),
        "load_s": load_s,
        "jobs_per_s": round(len(ended) / load_s, 2) if load_s else None,
        "chaos": events,
        "lost_ids": lost[:20],
        "duplicated_ids": duplicated[:20],
        "orphaned_ids": orphaned[:20],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500, help="submissions in all (default 500)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent REST clients (default 16)")
    parser.add_argument("--workers", type=int, default=2, help="c2p worker processes (default 2)")
    parser.add_argument("--worker-kills", type=int, default=3, help="SIGKILLs of a busy worker (default 3)")
    parser.add_argument("--redis-restarts", type=int, default=1, help="Redis stop + start (default 1)")
    parser.add_argument("--redis-down-s", type=float, default=2.0, help="seconds Redis stays down (default 2)")
    parser.add_argument("--restart-delay-s", type=float, default=0.5, help="a killed worker's replacement starts")
    parser.add_argument("--model", default=None, help="variant, checkpoint or export folder (default: shipped)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per worker")
    parser.add_argument(
        "--lease-s",
        type=float,
        default=None,
        help="C2P_QUEUE__LEASE_S, heartbeat and janitor a fifth of it (default: "
        "the shipped clocks, lease 10 s, heartbeat and janitor 2 s)",
    )
    parser.add_argument("--appendfsync", default="everysec", choices=["always", "everysec"])
    parser.add_argument("--deadline-s", type=float, default=600.0, help="the load's time limit: then lost = unended")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    args.prefix = "c2p"
    if args.jobs < 1 or args.clients < 1 or args.workers < 1:
        parser.error("--jobs, --clients and --workers must be >= 1")
    if args.worker_kills < 0 or args.redis_restarts < 0:
        parser.error("--worker-kills and --redis-restarts must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    random.seed(args.seed)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="c2p-drill-") as tmp:
        logs = Path(tmp)
        redis = DurableRedis(logs / "redis", fsync=args.appendfsync)
        clocks = {}
        if args.lease_s is not None:  # shorter than shipped, for a quick run; the drill's figures are the shipped ones
            beat = str(args.lease_s / 5)
            clocks = {"C2P_QUEUE__LEASE_S": str(args.lease_s), "C2P_WORKER__JANITOR_INTERVAL_S": beat,
                      "C2P_WORKER__HEARTBEAT_S": beat}  # fmt: skip
        env = service_env(
            redis.url,
            C2P_ENGINE__INTRA_OP_THREADS=str(args.threads),
            C2P_WORKER__OPS_PORT="0",  # several workers on one machine
            **clocks,
        )
        model = export_folder(args.model, env)
        fleet = Fleet(model, env, logs, f"http://127.0.0.1:{free_port()}", free_port())
        redis.start()
        try:
            fleet.start_gateway()
            for _ in range(args.workers):
                fleet.start_worker()
            asyncio.run(wait_ready(fleet.base, args.workers, fleet.processes(), 300))
            ready_s = round(time.monotonic() - began, 1)
            report = asyncio.run(drill(args, fleet, redis))
            exited = fleet.exited()
        finally:
            codes = end(fleet.processes())
            redis.stop()
        report["exited"] = exited
        report["shutdown_codes"] = codes
        if exited or report["jobs"]["lost"] or report["jobs"]["duplicated"]:
            report["logs_tail"] = {
                path.name: path.read_text(errors="replace")[-3000:] for path in sorted(logs.glob("*.log"))
            }
    report["parameters"] = {
        "jobs": args.jobs, "clients": args.clients, "workers": args.workers, "worker_kills": args.worker_kills,
        "redis_restarts": args.redis_restarts, "redis_down_s": args.redis_down_s, "model": model,
        "variant": json.loads((Path(model) / "card.json").read_text()).get("variant"), "threads": args.threads,
        "lease_s": args.lease_s, "appendfsync": args.appendfsync, "deadline_s": args.deadline_s,
    }  # fmt: skip
    report["startup_s"] = ready_s
    report["total_s"] = round(time.monotonic() - began, 1)
    report["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    bad = report["exited"] or report["jobs"]["lost"] or report["jobs"]["duplicated"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
