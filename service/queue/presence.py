"""Workers announce themselves in Redis once their engines are warm; readiness reads the announcements.

A key per worker with a short TTL, refreshed by its heartbeat: a worker that dies disappears on its
own within the TTL, and a gateway needs no connection to any worker to know whether one is serving.

Beside the announcements, the models' register ``{prefix}:models`` (a hash: ``NAME:VERSION`` -> name, version,
artifact digest) outlives every worker: a gateway routes a job to its model's stream by it while no worker runs
(a pool scaled to zero by KEDA wakes up on the stream's length, so the job must be queued first).
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


def _register_key(prefix: str) -> str:
    return f"{prefix}:models"


async def register(client: aioredis.Redis, prefix: str, models: list[dict[str, Any]]) -> None:
    """Record each model's name, version and digest for routing (a version re-exported with new bytes replaces
    the old digest: the version's name is what a caller pins). Registering a default model makes the others
    registered before it plain models: the deployment's default is the one its processes last started with."""
    if not models:
        return
    fields = {f"{m['name']}:{m['version']}": m for m in models}
    if any(m.get("default") for m in models):
        for known in await registered(client, prefix):
            key = f"{known.get('name')}:{known.get('version')}"
            if known.get("default") and key not in fields:
                fields[key] = {**known, "default": False}
    mapping = {key: json.dumps(value, sort_keys=True) for key, value in fields.items()}
    await client.hset(_register_key(prefix), mapping=mapping)


async def registered(client: aioredis.Redis, prefix: str) -> list[dict[str, Any]]:
    out = []
    for raw in (await client.hgetall(_register_key(prefix))).values():
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue
    return out
