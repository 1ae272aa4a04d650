"""Fault drills with real processes (`c2p gateway`, two `c2p worker`, a redis-server with its append-only file):
what an operator would do to a running service, and what the service must still promise afterwards.

- a client trickling its upload a few bytes at a time holds up nobody else;
- a worker SIGKILLed under load: every accepted job ends succeeded, none is lost, none is answered twice;
- Redis crashed and started again: the gateway answers 503 ``unavailable`` meanwhile (never 500, never hangs),
  gateway and worker recover on their own, and the jobs accepted before the crash (in the append-only file) finish.

One service serves the three drills, in this order (starting it costs seconds on a small machine); each drill
leaves it serving, with at least one worker.

Covered elsewhere, end to end, and not repeated here:

- a job that always crashes the engine ends in the dead-letter stream after ``max_deliveries``, with its error:
  tests/service/test_service.py::test_a_job_that_always_crashes_the_engine_ends_in_the_dead_letters (gateway app,
  real worker, real Redis; the engine raises on every delivery);
- SIGTERM drains the job in flight: tests/service/test_processes.py::test_sigterm_drains_the_job_in_flight (a real
  `c2p worker`); a lone worker killed mid-job:
  tests/service/test_processes.py::test_a_worker_killed_mid_job_loses_nothing.

The load and the chaos together, bounded, with figures: loadtests/drill.py (smoke-tested in test_loadtests.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from loadtests.drill import DurableRedis, consumer_of, end
from service.config import QueueSettings
from service.queue import JobQueue
from service.queue.redis_server import RedisStartError
from service.schema import Job
from tests.service.harness import disc_image, free_port, lane_for, png_bytes
from tests.service.test_processes import start_worker, volume_upload, worker_env

pytestmark = pytest.mark.slow

PNG = png_bytes(disc_image())
SLICES = 4  # per job in the load drills: jobs long enough to be caught in flight, short enough to be quick
PREFIX = "c2p"


@dataclass
class Service:
    redis: DurableRedis
    base: str
    gateway: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]  # the live ones: a drill that kills one removes it
    logs: Path
    lane: str  # the model's stream (service.queue.keys)

    def logs_text(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.glob("*.log"))
        )

    def assert_alive(self) -> None:
        """No process died on its own."""
        assert self.gateway.poll() is None and all(w.poll() is None for w in self.workers), self.logs_text()


def start_gateway(exported: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    ports = ["--port", str(port), "--grpc-port", str(free_port())]
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "gateway", *ports, "--model", str(exported)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}"


async def wait_ready(service: Service, timeout_s: float = 60) -> None:
    """Readiness counting every live worker as warm."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            service.assert_alive()
            with contextlib.suppress(httpx.TransportError):
                answer = await http.get(f"{service.base}/v2/health/ready")
                if answer.status_code == 200 and answer.json()["workers"] >= len(service.workers):
                    return
            assert time.monotonic() < deadline, f"not ready\n{service.logs_text()}"
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def service(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    logs = tmp_path_factory.mktemp("drills")
    try:
        redis = DurableRedis(logs / "redis", fsync="always")  # every acknowledged write is on disk
    except RedisStartError as err:
        pytest.skip(f"no redis-server to crash and restart: {err}")
    redis.start()
    env = worker_env(redis.url, PREFIX)  # job deadline 1.5 s, janitor and heartbeat every 0.3 s
    gateway, base = start_gateway(exported, env, logs / "gateway.log")
    workers = [start_worker(exported, env, logs / f"worker-{i}.log") for i in range(2)]
    running = Service(redis, base, gateway, workers, logs, lane_for(exported))
    try:
        asyncio.run(wait_ready(running))
        yield running
    finally:
        codes = end([gateway, *running.workers], 30)
        redis.stop()
    assert codes == [0] * len(codes), running.logs_text()  # SIGTERM: every survivor drained and exited cleanly


def volume_part(index: int, slices: int = SLICES) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The ``index``-th upload of a load: its own name, so it is a job of its own (the same upload sent again within
    the dedupe window would be answered with the first one's job)."""
    ((name, data),) = volume_upload(slices)
    return [("file", (f"{index}-{name}", data, "application/octet-stream"))]


async def wait_ended(queue: JobQueue, job_ids: list[str], timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = {job_id: (await queue.get(job_id)).status for job_id in job_ids}
        if all(s in ("succeeded", "failed") for s in statuses.values()) or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.1)


# -- a slow client --------------------------------------------------------------------------------------


def multipart(boundary: str) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="slow.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + PNG
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_a_slow_upload_holds_up_no_other_client(service: Service) -> None:
    """Three clients trickle their uploads at 40 bytes/s over raw sockets; everyone else is served as usual."""
    port = int(service.base.rsplit(":", 1)[1])
    body = multipart("drillboundary")
    stop = threading.Event()
    sent = [0, 0, 0]  # bytes of the body each slow client has sent

    def trickle(index: int, sock: socket.socket) -> None:
        head = (
            f"POST /v1/segmentations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary=drillboundary\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode())
        while not stop.is_set() and sent[index] < len(body) // 2:
            sock.sendall(body[sent[index] : sent[index] + 4])
            sent[index] += 4
            time.sleep(0.1)

    async def others() -> None:
        async with httpx.AsyncClient(base_url=service.base, timeout=10) as http:
            for i in range(5):
                start = time.monotonic()
                answer = await http.post("/v1/segmentations?wait=10", files=[("file", (f"{i}.png", PNG, "image/png"))])
                assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.text
                assert (await http.get("/v2/health/ready")).status_code == 200
                assert time.monotonic() - start < 3, f"request {i} took {time.monotonic() - start:.1f} s"

    sockets = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
    threads = [threading.Thread(target=trickle, args=(i, s), daemon=True) for i, s in enumerate(sockets)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.3)  # the slow requests are in the gateway, mid-body
        asyncio.run(others())
        assert all(thread.is_alive() for thread in threads)  # still trickling: in flight throughout
        stop.set()
        for thread in threads:
            thread.join(5)
        # The slow clients finish their bodies at last and are served too.
        for sock, offset in zip(sockets, sent, strict=True):
            sock.sendall(body[offset:])
            status_line = sock.recv(4096).split(b"\r\n", 1)[0]
            assert status_line in (b"HTTP/1.1 202 Accepted", b"HTTP/1.1 200 OK"), status_line
    finally:
        stop.set()
        for sock in sockets:
            sock.close()
    service.assert_alive()


# -- a worker killed under load -------------------------------------------------------------------------


async def count_endings(client: aioredis.Redis, counts: Counter[str], ready: asyncio.Event) -> None:
    """Every 'succeeded'/'failed' published for a job: a job that ended twice would be told twice."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe(f"{PREFIX}:done:*")
    ready.set()
    try:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message and message["data"] in (b"succeeded", b"failed"):
                counts[message["channel"].decode().rsplit(":", 1)[1]] += 1
    finally:
        await pubsub.aclose()


def test_a_worker_killed_under_load_loses_nothing_and_answers_nothing_twice(service: Service) -> None:
    assert len(service.workers) == 2

    async def scenario() -> None:
        client = aioredis.Redis.from_url(service.redis.url)
        queue = JobQueue(client, QueueSettings(prefix=PREFIX), lane=service.lane)
        endings: Counter[str] = Counter()
        subscribed = asyncio.Event()
        listener = asyncio.create_task(count_endings(client, endings, subscribed))
        await subscribed.wait()
        try:
            async with httpx.AsyncClient(base_url=service.base, timeout=30) as http:
                answers = await asyncio.gather(
                    *(http.post("/v1/segmentations", files=volume_part(i)) for i in range(40))
                )
            assert [a.status_code for a in answers] == [202] * 40, answers[0].text
            job_ids = [a.json()["id"] for a in answers]
            # Mid-way: some jobs done (their entries are deleted), and the worker to kill holding jobs it started.
            deadline = time.monotonic() + 60
            while True:
                summary = await client.xpending(queue.stream, queue.group)
                held = {c["name"].decode(): int(c["pending"]) for c in summary["consumers"] or []}
                done = 40 - await client.xlen(queue.stream)
                victim = max(service.workers, key=lambda w: held.get(consumer_of(w), 0))
                if done >= 4 and held.get(consumer_of(victim), 0) > 0:
                    break
                assert done < 40 and time.monotonic() < deadline, f"no moment to kill: {done} done, {held}"
                await asyncio.sleep(0.02)
            victim.kill()
            victim.wait(10)
            service.workers.remove(victim)
            statuses = await wait_ended(queue, job_ids, 60)
            assert Counter(statuses.values()) == {"succeeded": 40}, service.logs_text()
            jobs = [await queue.get(j) for j in job_ids]
            assert all(job.result is not None and len(job.result.mask.slices) == SLICES for job in jobs)
            # The killed worker's jobs ran again on the other one (deliveries counts them) ...
            assert sum(job.deliveries > 1 for job in jobs) >= 1, [job.deliveries for job in jobs]
            # ... and yet each job ended, and was announced, exactly once.
            await asyncio.sleep(0.3)
            assert {job_id: endings[job_id] for job_id in job_ids} == dict.fromkeys(job_ids, 1), endings
            stats = await queue.stats()
            assert (stats.length, stats.pending, stats.dead_letters) == (0, 0, 0)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await client.aclose()

    asyncio.run(scenario())
    service.assert_alive()


# -- Redis crashed and restarted ------------------------------------------------------------------------


async def submit_in_flight(service: Service, http: httpx.AsyncClient, jobs: int) -> list[str]:
    """``jobs`` volumes submitted at once; returns their ids once the first has started (some then run, some wait)."""
    answers = await asyncio.gather(*(http.post("/v1/segmentations", files=volume_part(i)) for i in range(jobs)))
    assert [a.status_code for a in answers] == [202] * jobs, [a.text for a in answers if a.status_code != 202]
    job_ids = [a.json()["id"] for a in answers]
    client = aioredis.Redis.from_url(service.redis.url)
    try:
        queue = JobQueue(client, QueueSettings(prefix=PREFIX), lane=service.lane)
        while (await queue.get(job_ids[0])).status == "queued":
            await asyncio.sleep(0.02)
        statuses = Counter([(await queue.get(j)).status for j in job_ids])
    finally:
        await client.aclose()
    assert statuses["running"] > 0, statuses
    return job_ids


async def ended_jobs(service: Service, job_ids: list[str]) -> list[Job]:
    """The jobs once all have ended (60 s at most), each succeeded; Redis left with nothing queued or pending."""
    client = aioredis.Redis.from_url(service.redis.url)
    try:
        queue = JobQueue(client, QueueSettings(prefix=PREFIX), lane=service.lane)
        statuses = await wait_ended(queue, job_ids, 60)
        assert Counter(statuses.values()) == {"succeeded": len(job_ids)}, (statuses, service.logs_text())
        stats = await queue.stats()
        assert (stats.length, stats.pending, stats.dead_letters) == (0, 0, 0)
        return [await queue.get(j) for j in job_ids]
    finally:
        await client.aclose()


def test_redis_crash_and_restart(service: Service) -> None:
    """Redis SIGKILLed with jobs queued and running, then started again on its append-only file: meanwhile the
    gateway answers 503 fast; afterwards gateway and workers carry on by themselves and the earlier jobs finish."""

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=service.base, timeout=30) as http:
            job_ids = await submit_in_flight(service, http, 24)  # more than both workers take at once: some wait
            service.redis.stop(signal.SIGKILL)  # a crash: nothing is flushed beyond what appendfsync always wrote

            down = time.monotonic()
            while time.monotonic() - down < 2.0:  # what callers see while Redis is down
                for method, path, files in (
                    ("POST", "/v1/segmentations", [("file", ("b.png", PNG, "image/png"))]),
                    ("GET", "/v2/health/ready", None),
                    ("GET", f"/v1/segmentations/{job_ids[0]}", None),
                ):
                    start = time.monotonic()
                    answer = await http.request(method, path, files=files, timeout=10)
                    assert answer.status_code == 503, (path, answer.status_code, answer.text)
                    assert answer.json()["code"] == "unavailable", answer.text
                    assert time.monotonic() - start < 3, f"{path} took {time.monotonic() - start:.1f} s"
                await asyncio.sleep(0.1)
            service.assert_alive()

            await asyncio.to_thread(service.redis.start)  # same port, same data; gateway and workers left alone
            await wait_ready(service)
            await ended_jobs(service, job_ids)  # accepted before the crash: kept by the append-only file, finished
            for _ in range(20):  # as a client told 503 would, retry: the next test wants no 503 at all here
                after = await http.post("/v1/segmentations?wait=30", files=[("file", ("c.png", PNG, "image/png"))])
                if after.status_code != 503:
                    break
                await asyncio.sleep(0.05)
            assert after.status_code == 200 and after.json()["status"] == "succeeded", after.text

    asyncio.run(scenario())
    service.assert_alive()


def test_after_a_redis_restart_no_request_or_job_fails_on_a_dead_connection(service: Service) -> None:
    """Connections pooled before a restart are dead after it. Traffic resuming at once, concurrently, must get fresh
    ones rather than errors, and a job that was running costs one more delivery, not two."""

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=service.base, timeout=30) as http:
            job_ids = await submit_in_flight(service, http, 24)  # the pools now hold many connections
            service.redis.stop(signal.SIGKILL)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(service.redis.start)
            await wait_ready(service)
            burst = await asyncio.gather(
                *(
                    http.post("/v1/segmentations?wait=30", files=[("file", ("c.png", PNG, "image/png"))])
                    for _ in range(8)
                )
            )
            assert [a.status_code for a in burst] == [200] * 8, [a.text for a in burst if a.status_code != 200]
            jobs = await ended_jobs(service, job_ids)
            assert max(job.deliveries for job in jobs) <= 2, sorted(job.deliveries for job in jobs)

    asyncio.run(scenario())
    service.assert_alive()
