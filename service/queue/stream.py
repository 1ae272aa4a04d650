"""The jobs stream and its one consumer group: creating the group, surviving its loss, removing entries, measuring.

Why: every other part reads or acknowledges entries, and each must agree on how an entry leaves (XACK then XDEL,
so XLEN stays the number of jobs queued or running that ``max_pending`` bounds) and on what to do when a Redis
restarted without persistence has lost the group. Settling both here keeps the stream's invariants in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service.queue.connection import redis_errors, text
from service.queue.keys import QueueKeys

T = TypeVar("T")

# The start of every script that ends an entry. Conventions: the stream is always KEYS[1] where present; ``ack``
# removes the entry from the group's pending list and from the stream together, XACK first so no entry is ever
# deleted while pending.
ACK_LUA = """
local function ack(stream, group, id)
  redis.pcall('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
end
"""


@dataclass(frozen=True)
class QueueStats:
    length: int  # jobs queued or running (entries are deleted when their job ends)
    pending: int  # delivered to a worker and not yet acknowledged
    lag: int | None  # entries not yet delivered to the group (Redis >= 7; None when unknown)
    dead_letters: int
    consumers: int


class Stream:
    def __init__(self, client: aioredis.Redis, keys: QueueKeys) -> None:
        self._client = client
        self._keys = keys

    @redis_errors
    async def ensure_group(self) -> None:
        """Create the group from the stream's start (id 0), so jobs submitted before any worker count."""
        try:
            await self._client.xgroup_create(self._keys.stream, self._keys.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def with_group(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call``; if Redis lost the group (a restart without persistence), create it and retry once."""
        try:
            return await call()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        await self.ensure_group()
        return await call()

    async def drop_entry(self, entry_id: str) -> None:
        """For an entry submit() did not write: nothing to run, nothing else to clean up."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xack(self._keys.stream, self._keys.group, entry_id)
            pipe.xdel(self._keys.stream, entry_id)
            await pipe.execute()

    @redis_errors
    async def stats(self) -> QueueStats:
        """Works with Redis >= 6.2; ``lag`` needs Redis >= 7."""
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xlen(self._keys.stream)
            pipe.xlen(self._keys.dead)
            length, dead = await pipe.execute()
        pending = consumers = 0
        lag: int | None = None
        try:
            groups = await self._client.xinfo_groups(self._keys.stream)
        except ResponseError:  # no stream yet
            groups = []
        for group in groups:
            info = {text(k): v for k, v in group.items()}
            if text(info.get("name")) == self._keys.group:
                pending = int(info.get("pending") or 0)
                consumers = int(info.get("consumers") or 0)
                lag = int(info["lag"]) if info.get("lag") is not None else None
        return QueueStats(length=int(length), pending=pending, lag=lag, dead_letters=int(dead), consumers=consumers)
