"""Issue 21, item 4: jobs are admitted by the bytes they will hold in Redis, against a budget from maxmemory, and a
Redis that could evict job data is refused. Real redis-server processes of the test's own (their memory settings
are changed, so never the shared one)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from service.config import QueueSettings
from service.dataplane.submit import result_bytes
from service.errors import PayloadTooLarge, StorageFull, Unavailable
from service.gateway.app import create_app
from service.queue import JobQueue
from service.queue.memory import RedisMemory, budget_of, eviction_problem
from service.queue.redis_server import PrivateRedis
from tests.service.harness import make_settings, png_bytes, running
from tests.service.test_service import upload

LANE = "0123456789ab"
META = {"format": "png", "modality": "US", "shape": [1, 2, 2]}


@pytest.fixture
def own_redis() -> Iterator[str]:
    with PrivateRedis(unix_socket=True) as server:
        yield server.url


def test_the_policy_and_the_budget_by_hand() -> None:
    settings = QueueSettings()
    assert eviction_problem(RedisMemory(0, 0, "allkeys-lru")) is None  # no maxmemory: nothing is ever evicted
    assert eviction_problem(RedisMemory(0, 1 << 30, "noeviction")) is None
    for policy in ("allkeys-lru", "volatile-ttl", "volatile-lru"):
        problem = eviction_problem(RedisMemory(0, 1 << 30, policy))
        assert problem is not None and policy in problem and "noeviction" in problem
    assert budget_of(RedisMemory(0, 1000, "noeviction"), settings) == 800
    assert budget_of(RedisMemory(0, 0, "noeviction"), settings) is None
    assert budget_of(RedisMemory(0, 1000, "noeviction"), QueueSettings(max_bytes=123)) == 123


def test_a_full_budget_refuses_before_anything_is_stored(own_redis: str) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(own_redis)
        await client.config_set("maxmemory", str(24 << 20))
        await client.config_set("maxmemory-policy", "noeviction")
        queue = JobQueue(client, QueueSettings(prefix="tmem", dedupe_window_s=0), lane=LANE)
        try:
            await queue.ensure_group()
            big = os.urandom(4 << 20)  # incompressible: 4 MiB each in Redis
            admitted = 0
            with pytest.raises(StorageFull) as refused:
                for i in range(10):
                    await queue.submit([(f"{i}.bin", big)], META, tenant="t1")
                    admitted += 1
            assert 2 <= admitted <= 5  # 80 % of 24 MiB, minus what Redis holds already
            assert refused.value.retry_after_s == queue.settings.retry_after_s
            assert "budget" in refused.value.message
            payloads = [key async for key in client.scan_iter(match="tmem:payload:*")]
            assert len(payloads) == admitted and (await queue.stats()).length == admitted  # nothing half-stored
            with pytest.raises(PayloadTooLarge):  # larger than the whole budget: retrying cannot help
                await queue.submit([("huge.bin", bytes(30 << 20))], META, tenant="t1")
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_rest_answers_503_with_retry_after_when_redis_is_full(
    own_redis: str, queue_settings: QueueSettings, exported: Path
) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (700, 700), dtype=np.uint8)
    image = png_bytes(noise)  # incompressible: ~0.5 MB stored, and ~0.5 MB of kept preview expected
    job_bytes = len(image) + result_bytes((1, 700, 700))

    async def scenario() -> None:
        client = aioredis.Redis.from_url(own_redis)
        used = int((await client.info("memory"))["used_memory"])
        await client.aclose()
        # room for one job and a half: the first is admitted, the second (with the first one's upload stored) is not
        queue = queue_settings.model_copy(update={"max_bytes": used + int(job_bytes * 1.3)})
        settings = make_settings(own_redis, queue, exported)
        async with running(settings, None) as (http, _):
            first = await http.post("/v1/segmentations", files=upload(("a.png", image)))
            assert first.status_code == 202, first.text
            full = await http.post("/v1/segmentations", files=upload(("b.png", image)))
            assert full.status_code == 503 and full.json()["code"] == "storage_full", full.text
            assert full.headers["retry-after"] == str(settings.queue.retry_after_s)

    asyncio.run(scenario())


def test_an_evicting_redis_is_refused_at_start_and_for_submits(
    own_redis: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(own_redis, queue_settings, exported)

    async def scenario() -> None:
        client = aioredis.Redis.from_url(own_redis)
        try:
            await client.config_set("maxmemory", str(64 << 20))
            await client.config_set("maxmemory-policy", "allkeys-lru")
            app = create_app(settings)
            with pytest.raises(ValueError, match="allkeys-lru"):
                async with app.router.lifespan_context(app):
                    pass
            allowed = settings.model_copy(update={"queue": settings.queue.model_copy(update={"allow_eviction": True})})
            app = create_app(allowed)
            async with app.router.lifespan_context(app):
                pass  # starts, with a warning
            # changed while running: every submit says why, nothing is stored
            queue = JobQueue(client, settings.queue, lane=LANE)
            await client.config_set("maxmemory-policy", "volatile-lru")
            with pytest.raises(Unavailable, match="volatile-lru"):
                await queue.submit([("a.png", b"x")], META, tenant="t1")
            assert [key async for key in client.scan_iter(match=f"{settings.queue.prefix}:payload:*")] == []
        finally:
            await client.aclose()

    asyncio.run(scenario())
