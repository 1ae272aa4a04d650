"""Series assembly: the instances of one DICOM series, posted in several STOW-RS requests, collected into one job.

Why: a PACS or modality often sends a series one instance per request; queued as it arrives, a 300-slice CT
would become 300 one-slice jobs, none of which sees the volume. So instances wait here, per tenant and series,
until none has arrived for a quiet period; then the first gateway to claim the series submits it as one job.
Claiming is one atomic step (ZREM decides), so several gateways never submit a series twice. An instance is kept
once per series (HSETNX), and after its series became a job its SOPInstanceUID answers with that job, so a
sender's retry never makes a second one.

Keys under the prefix (no UID in a name: ``h`` is a hash of tenant and UID)::

    {p}:assembly:{h}         hash SOPInstanceUID -> the instance's bytes, TTL payload_ttl_s, refreshed per add
    {p}:assembly:{h}:info    hash: tenant, series_uid, deliver
    {p}:assembling           sorted set of h by the time its last instance arrived
    {p}:instance:{h}         the job an instance became part of, TTL record_ttl
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from service.config import QueueSettings
from service.queue.connection import redis_errors, text
from service.queue.keys import QueueKeys

# KEYS: assembling, instances, info. ARGV: h. Returns {info..., instances...} flattened, or nil when another
# gateway claimed the series first.
_TAKE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return false
end
local info = redis.call('HGETALL', KEYS[3])
local instances = redis.call('HGETALL', KEYS[2])
redis.call('DEL', KEYS[2], KEYS[3])
return {info, instances}
"""


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Assembled:
    """A series whose quiet period ended: its instances (SOPInstanceUID -> bytes) and who sent them."""

    tenant: str
    series_uid: str
    deliver: str | None  # how the finished SEG goes back ("dicomweb", "dimse"), or None
    instances: dict[str, bytes]


class Assembly:
    def __init__(self, client: aioredis.Redis, settings: QueueSettings, keys: QueueKeys) -> None:
        self._client = client
        self._settings = settings
        p = settings.prefix
        self._prefix = p
        self._assembling = f"{p}:assembling"
        self._record_ttl = keys.record_ttl
        self._take = client.register_script(_TAKE)

    def _series(self, tenant: str, series_uid: str) -> tuple[str, str, str]:
        h = _hash(tenant, series_uid)
        return h, f"{self._prefix}:assembly:{h}", f"{self._prefix}:assembly:{h}:info"

    def _instance(self, tenant: str, sop_uid: str) -> str:
        return f"{self._prefix}:instance:{_hash(tenant, sop_uid)}"

    @redis_errors
    async def jobs_of(self, tenant: str, sop_uids: Sequence[str]) -> list[str | None]:
        """The job each instance already became part of (None: not yet, or never sent)."""
        if not sop_uids:
            return []
        return [text(v) for v in await self._client.mget([self._instance(tenant, uid) for uid in sop_uids])]

    @redis_errors
    async def add(
        self, tenant: str, series_uid: str, deliver: str | None, instances: Sequence[tuple[str, bytes]]
    ) -> None:
        """Keep the instances (each once) and restart the series' quiet period."""
        h, stored, info = self._series(tenant, series_uid)
        ttl = self._settings.payload_ttl_s
        async with self._client.pipeline(transaction=True) as pipe:
            for sop_uid, data in instances:
                pipe.hsetnx(stored, sop_uid, data)
            pipe.hset(info, mapping={"tenant": tenant, "series_uid": series_uid, "deliver": deliver or ""})
            pipe.expire(stored, ttl)
            pipe.expire(info, ttl)
            pipe.zadd(self._assembling, {h: time.time()})
            await pipe.execute()

    @redis_errors
    async def take_due(self, quiet_s: float, limit: int = 16) -> list[Assembled]:
        """The series quiet for ``quiet_s`` that this caller claimed (each goes to exactly one caller)."""
        due = await self._client.zrangebyscore(self._assembling, "-inf", time.time() - quiet_s, start=0, num=limit)
        taken = []
        for raw in due:
            h = text(raw) or ""
            stored, info = f"{self._prefix}:assembly:{h}", f"{self._prefix}:assembly:{h}:info"
            reply = await self._take(keys=[self._assembling, stored, info], args=[h])
            if not reply:
                continue
            info_fields, instance_fields = reply
            meta = {text(info_fields[i]): text(info_fields[i + 1]) for i in range(0, len(info_fields), 2)}
            instances = {
                text(instance_fields[i]) or "": instance_fields[i + 1] for i in range(0, len(instance_fields), 2)
            }
            if not instances or not meta.get("tenant") or not meta.get("series_uid"):
                continue  # its keys expired while it waited: nothing left to submit
            taken.append(
                Assembled(meta["tenant"] or "", meta["series_uid"] or "", meta.get("deliver") or None, instances)
            )
        return taken

    @redis_errors
    async def remember(self, tenant: str, sop_uids: Sequence[str], job_id: str) -> None:
        """Which job these instances became: a retry of one of them answers with it."""
        async with self._client.pipeline(transaction=False) as pipe:
            for uid in sop_uids:
                pipe.set(self._instance(tenant, uid), job_id, ex=self._record_ttl)
            await pipe.execute()
