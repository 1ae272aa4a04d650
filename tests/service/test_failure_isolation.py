"""Issue 21, items 2 and 3, through the gateway and a worker on real Redis: a job past its timeout fails with
job_timeout (a server failure, dead-lettered); a hung engine call fails only its batch, the next batch runs, and a
worker with too many calls stuck stops itself and hands its jobs back; a poisonous image shares a batch with good
ones and fails alone."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np

from service.config import QueueSettings
from tests.service.harness import disc_image, engine_for, lane_for, make_settings, png_bytes, running
from tests.service.test_service import upload


class WrappedEngine:
    """The real engine's artifact and outputs, with a fault injected by ``before`` (per batch)."""

    def __init__(self, engine: object, before) -> None:
        self.engine = engine
        self.artifact = engine.artifact
        self.device = "cpu"
        self.before = before

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.before(images)
        return self.engine.run(images)


def test_a_job_past_its_timeout_fails_with_job_timeout_and_is_dead_lettered(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(
        redis_url, queue_settings, exported, job_timeout_s=0.5, job_timeout_per_slice_s=0.0, batch_timeout_s=30
    )
    slow = WrappedEngine(engine_for(exported), lambda images: time.sleep(2.0))

    async def scenario() -> None:
        async with running(settings, slow) as (http, worker):
            started = time.monotonic()
            response = await http.post("/v1/segmentations?wait=20", files=upload(("a.png", png_bytes(disc_image()))))
            assert response.status_code == 504, response.text
            assert response.json()["code"] == "job_timeout"
            assert time.monotonic() - started < 5  # stopped at its timeout, not when the engine came back
            stats = await worker.queue.stats(lane_for(exported))
            assert stats.dead_letters == 1
            assert not worker.stopping.is_set()  # the worker itself is fine

    asyncio.run(scenario())


def test_a_hung_engine_fails_its_batch_then_the_worker_hands_its_jobs_back_and_stops(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported, batch_timeout_s=0.5, max_hung_engine_calls=2)
    release = threading.Event()
    calls = {"n": 0}

    def hang_twice(images: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] in (1, 3):
            release.wait(30)

    hanging = WrappedEngine(engine_for(exported), hang_twice)

    async def scenario() -> None:
        async with running(settings, hanging) as (http, worker):
            image = ("a.png", png_bytes(disc_image()))
            first = await http.post("/v1/segmentations?wait=20", files=upload(image))
            # the first delivery hit the hang and was handed back; the redelivery ran on a fresh thread
            assert first.status_code == 200, first.text
            assert first.json()["deliveries"] == 2
            assert worker.failed is None and worker.ready.is_set()
            second = await http.post("/v1/segmentations", files=upload(image))
            job_id = second.json()["id"]
            for _ in range(200):  # the second hang: two calls stuck, the worker stops itself
                if worker.stopping.is_set():
                    break
                await asyncio.sleep(0.05)
            assert worker.failed is not None and "hung" in worker.failed
            assert not worker.ready.is_set()
            release.set()
            for _ in range(200):
                status = (await http.get(f"/v1/segmentations/{job_id}")).json()["status"]
                if status != "running":
                    break
                await asyncio.sleep(0.05)
            assert status == "queued"  # handed back for a healthy worker, not lost

    asyncio.run(scenario())


def test_a_poisonous_image_fails_alone_and_its_batch_mates_succeed(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    """One image makes the engine raise whenever it is in a batch; the other jobs sharing its batch succeed, and
    the poisonous job ends with delivery_limit, a 5xx naming the engine's error."""
    queue = queue_settings.model_copy(update={"max_deliveries": 2, "lease_s": 0.5})
    settings = make_settings(redis_url, queue, exported, max_queue_delay_ms=300.0)
    # The network's input is normalised: white (255) is above 2 there, the disc images' brightest grey below 1.4.
    poison_image = disc_image()
    poison_image[40:56, 56:72] = 255
    shared = []

    def refuse_poison(images: np.ndarray) -> None:
        if any(float(image[0].max()) > 2.0 for image in images):
            shared.append(len(images) > 1)
            raise RuntimeError("engine crashed on this input")

    engine = WrappedEngine(engine_for(exported), refuse_poison)

    async def scenario() -> None:
        async with running(settings, engine) as (http, _):
            good = [("g.png", png_bytes(disc_image(radius=r))) for r in (12, 16, 20)]
            posts = [http.post("/v1/segmentations?wait=30", files=upload(image)) for image in good]
            posts.append(http.post("/v1/segmentations?wait=30", files=upload(("p.png", png_bytes(poison_image)))))
            *fine, bad = await asyncio.gather(*posts)
            assert [r.status_code for r in fine] == [200, 200, 200], [r.text for r in fine]
            assert bad.status_code == 500 and bad.json()["code"] == "delivery_limit"
            assert "engine crashed on this input" in bad.json()["message"]
            assert any(shared), "the poisonous image never shared a batch: nothing was isolated"

    asyncio.run(scenario())
