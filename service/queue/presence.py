"""Workers announce themselves in Redis once their engine is warm; readiness reads the announcements.

A key per worker with a short TTL, refreshed by its heartbeat: a worker that dies disappears on its
own within the TTL, and a gateway needs no connection to any worker to know whether one is serving.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis


def _key(prefix: str, consumer: str) -> str:
    return f"{prefix}:worker:{consumer}"


async def announce(client: aioredis.Redis, prefix: str, consumer: str, info: dict[str, Any], ttl_s: float) -> None:
    await client.set(_key(prefix, consumer), json.dumps(info), px=max(1, int(ttl_s * 1000)))


async def withdraw(client: aioredis.Redis, prefix: str, consumer: str) -> None:
    await client.delete(_key(prefix, consumer))


async def ready_workers(client: aioredis.Redis, prefix: str) -> list[dict[str, Any]]:
    """The announcements of live, warm workers (a handful of keys: SCAN is cheap here)."""
    workers = []
    async for key in client.scan_iter(match=f"{prefix}:worker:*", count=100):
        raw = await client.get(key)
        if raw is not None:
            workers.append(json.loads(raw))
    return workers
