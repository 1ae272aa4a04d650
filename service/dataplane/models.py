"""What the service serves and whether it is ready, read from the workers' announcements (service/queue/presence.py).

A gateway knows of models only what warm workers announce: their variant and the digest of the artifact they run.
Every API resolves names by the same rules here (the variant, or the alias ``c2p``; versions are the first 12 hex
digits of the digest, as ``result.model.digest`` reports them) and answers readiness the same way: ready while
Redis answers and at least one warm worker has announced itself.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.errors import ModelNotFound, Unavailable
from service.queue import JobQueue, presence

ALIAS = "c2p"
SERVER_NAME = "c2p-serve"
VERSION_DIGITS = 12
# Announcements are read with SCAN; an infer request reuses a read this recent instead of scanning per request.
WORKERS_TTL_S = 2.0


@dataclass(frozen=True)
class Served:
    """What a model name resolves to: the canonical name and the versions warm workers serve."""

    name: str
    versions: tuple[str, ...]


def server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0"


def _version(worker: dict[str, Any]) -> str:
    return str(worker.get("digest", ""))[:VERSION_DIGITS]


def served_by(workers: list[dict[str, Any]], model: str, version: str | None) -> Served:
    """The model a name and optional version mean, on announcements already read: 404 for names and versions
    nobody serves."""
    variants = sorted({str(w.get("model", "")) for w in workers} - {""})
    if model == ALIAS:
        serving = workers
        name = variants[0] if variants else ALIAS
    elif model in variants:
        serving = [w for w in workers if w.get("model") == model]
        name = model
    else:
        known = ", ".join([ALIAS, *variants])
        raise ModelNotFound(f"unknown model {model!r}; this server serves {known}")
    versions = tuple(sorted({_version(w) for w in serving} - {""}))
    if version is not None and version not in versions:
        served = ", ".join(versions) or "none while no worker is warm"
        raise ModelNotFound(f"model {model!r} has no version {version!r}; versions served: {served}")
    return Served(name, versions)


class ModelDirectory:
    """The announcements of one gateway's Redis, re-read per metadata call and at most every WORKERS_TTL_S for
    inference (a fresh SCAN per infer request would cost Redis more than the request)."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._read: tuple[float, list[dict[str, Any]]] | None = None

    async def workers(self, fresh: bool = True) -> list[dict[str, Any]]:
        now = time.monotonic()
        if fresh or self._read is None or now - self._read[0] >= WORKERS_TTL_S:
            try:
                workers = await presence.ready_workers(self.client, self.prefix)
            except (RedisError, OSError) as exc:
                raise Unavailable("redis is not answering") from exc
            self._read = (now, workers)
        return self._read[1]

    async def resolve(self, model: str, version: str | None, fresh: bool = True) -> Served:
        return served_by(await self.workers(fresh), model, version)

    async def ready_model(self, model: str, version: str | None) -> Served:
        """The model, while a warm worker serves it; Unavailable (not ready) until one does."""
        served = await self.resolve(model, version)
        if not served.versions:
            raise Unavailable(f"model {model!r} is not ready: no worker has warmed it up yet")
        return served


async def ready_workers(
    queue: JobQueue, client: aioredis.Redis, prefix: str, timeout_s: float | None = None
) -> list[dict[str, Any]]:
    """The warm workers behind this gateway; Unavailable when Redis does not answer or none has announced itself
    (a gateway without workers would accept jobs that nobody runs). ``timeout_s`` bounds the whole check."""
    if not await queue.ping(2.0 if timeout_s is None else timeout_s):
        raise Unavailable("redis is not answering")
    try:
        async with asyncio.timeout(timeout_s):
            workers = await presence.ready_workers(client, prefix)
    except (RedisError, OSError) as exc:  # TimeoutError is an OSError
        raise Unavailable("redis is not answering") from exc
    if not workers:
        raise Unavailable("no worker has warmed up a model yet")
    return workers


async def is_ready(queue: JobQueue, client: aioredis.Redis, prefix: str, timeout_s: float = 2.0) -> bool:
    """``ready_workers`` as a bool, for health services that poll (a bad announcement reads not ready)."""
    try:
        return bool(await ready_workers(queue, client, prefix, timeout_s))
    except (Unavailable, ValueError):
        return False
