"""Redis's memory as the queue's budget: a job is admitted by the bytes it will hold, and only where nothing of it can
be evicted.

Why bytes and not jobs: the job cap (``max_pending``) counts entries, and a burst of large volumes can fill Redis long
before it is reached; past ``maxmemory`` a noeviction Redis refuses writes halfway through an upload, and an evicting
one drops keys silently, a stored result among them. So the gateway asks before it stores: the memory Redis uses now,
plus what this gateway is storing at the moment, plus the job, must fit the budget (``queue.max_bytes``, or a share
of ``maxmemory``), else 503 with Retry-After and nothing written. Redis's own figures come from INFO (which managed
services keep even where CONFIG is renamed), read at most every ``REFRESH_S``.

Eviction: with any ``maxmemory-policy`` but ``noeviction`` Redis may delete job records, payloads and results (they all
carry TTLs, so even the volatile-* policies take them). Such a Redis is refused for submits, with the reason, unless
``queue.allow_eviction`` says the operator accepts it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.config import QueueSettings
from service.errors import PayloadTooLarge, StorageFull, Unavailable

log = logging.getLogger(__name__)

REFRESH_S = 0.5
# Of maxmemory, what jobs may fill: the rest is room for the streams, the AOF rewrite buffer and fragmentation.
SHARE_OF_MAXMEMORY = 0.8
SAFE_POLICY = "noeviction"


@dataclass(frozen=True)
class RedisMemory:
    used: int  # used_memory
    maxmemory: int  # 0: no limit
    policy: str


def eviction_problem(memory: RedisMemory) -> str | None:
    """Why this Redis could lose job data to eviction; None when it cannot (noeviction, or no maxmemory at all)."""
    if memory.policy == SAFE_POLICY or memory.maxmemory == 0:
        return None
    return (
        f"Redis's maxmemory-policy is {memory.policy}: at maxmemory it would evict job records, uploads and "
        f"results (they carry TTLs), losing them silently; set maxmemory-policy {SAFE_POLICY}, or "
        "C2P_QUEUE__ALLOW_EVICTION=true to accept the loss"
    )


def budget_of(memory: RedisMemory, settings: QueueSettings) -> int | None:
    """The bytes jobs may fill: the setting, else a share of maxmemory; None when neither bounds it."""
    if settings.max_bytes:
        return settings.max_bytes
    if memory.maxmemory:
        return int(memory.maxmemory * SHARE_OF_MAXMEMORY)
    return None


async def read_memory(client: aioredis.Redis) -> RedisMemory:
    info = await client.info("memory")
    return RedisMemory(
        used=int(info.get("used_memory", 0)),
        maxmemory=int(info.get("maxmemory", 0)),
        policy=str(info.get("maxmemory_policy", SAFE_POLICY)),
    )


class MemoryBudget:
    """One per gateway process: Redis's figures, cached briefly, and the bytes this process is storing now."""

    def __init__(self, client: aioredis.Redis, settings: QueueSettings) -> None:
        self._client = client
        self._settings = settings
        self._memory: RedisMemory | None = None
        self._read_at = 0.0
        self._warned = False
        self.storing = 0  # bytes of uploads this process is writing to Redis right now

    async def memory(self) -> RedisMemory:
        if self._memory is None or time.monotonic() - self._read_at > REFRESH_S:
            self._memory = await read_memory(self._client)
            self._read_at = time.monotonic()
        return self._memory

    async def check_policy(self) -> None:
        """Unavailable while Redis could evict job data (unless allowed; then one warning)."""
        problem = eviction_problem(await self.memory())
        if problem is None:
            return
        if not self._settings.allow_eviction:
            raise Unavailable(problem)
        if not self._warned:
            log.warning("%s (allowed by queue.allow_eviction)", problem)
            self._warned = True

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        """Hold ``nbytes`` of the budget while a job's upload is stored; StorageFull before anything is written."""
        await self.check_policy()
        memory = await self.memory()
        budget = budget_of(memory, self._settings)
        if budget is not None and nbytes > budget:
            raise PayloadTooLarge(
                f"this job needs {nbytes >> 20} MiB in Redis, more than its {budget >> 20} MiB budget"
            )
        if budget is not None and memory.used + self.storing + nbytes > budget:
            after = self._settings.retry_after_s
            raise StorageFull(
                f"Redis holds {memory.used >> 20} MiB of its {budget >> 20} MiB budget for jobs and this job needs "
                f"{max(1, nbytes >> 20)} MiB more; retry in {after} s",
                after,
            )
        self.storing += nbytes
        try:
            yield
        finally:
            self.storing -= nbytes
            self._memory = None  # what was just stored counts in Redis's figure from now on: read it afresh


async def check_eviction(client: aioredis.Redis, settings: QueueSettings) -> None:
    """At start: refuse a Redis that could evict job data (ValueError, so the process does not come up serving
    jobs it may lose), warn once where that is allowed; a Redis not answering yet is checked on the first submit."""
    try:
        memory = await read_memory(client)
    except (RedisError, OSError):
        return
    problem = eviction_problem(memory)
    if problem is not None and not settings.allow_eviction:
        raise ValueError(problem)
    if problem is not None:
        log.warning("%s (allowed by queue.allow_eviction)", problem)


_BUDGETS: weakref.WeakKeyDictionary[aioredis.Redis, MemoryBudget] = weakref.WeakKeyDictionary()


def budget_for(client: aioredis.Redis, settings: QueueSettings) -> MemoryBudget:
    """The one budget of a Redis client: every queue object on it (REST, gRPC, each lane) shares what it is storing."""
    budget = _BUDGETS.get(client)
    if budget is None:
        budget = _BUDGETS[client] = MemoryBudget(client, settings)
    return budget
