"""Admission: whether a job gets into the queue (the queue's cap, the tenant's quota) and, if so, enqueuing it.

Why one module: the caps are what keeps one tenant, or a burst, from filling Redis with uploads, and both are
decided in the same atomic step that enqueues, so concurrent submits cannot overshoot either. The tenant counter
this step raises is lowered by whichever script ends the job; ``RELEASE_SLOT_LUA`` is that half, kept here next to
the half that takes a slot so the two cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis

from service.config import QueueSettings
from service.errors import QueueFull
from service.queue.blobs import Blobs
from service.queue.connection import redis_errors
from service.queue.keys import QueueKeys, new_job_id, now
from service.schema import Job

# Prepended (after ``ACK_LUA``) to every script that ends a job queued or running: gives its tenant's slot back.
RELEASE_SLOT_LUA = """local function release_slot(tenants, tenant)
  if tenant and tenant ~= '' then
    if redis.call('HINCRBY', tenants, tenant, -1) <= 0 then
      redis.call('HDEL', tenants, tenant)
    end
  end
end
"""

# KEYS: stream, record, payload, tenants. ARGV: max_pending, job_id, now, meta, record_ttl, tenant, tenant_max
# (0: no per-tenant cap), lane (the stream's, kept in the record so a delete finds the entry). Returns the entry
# id, or 0 (queue full) / 1 (the tenant's quota full). The checks and the XADD are one atomic step, so concurrent
# submits cannot overshoot either cap.
_SUBMIT = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[3])
  return 0
end
local quota = tonumber(ARGV[7])
if quota > 0 and tonumber(redis.call('HGET', KEYS[4], ARGV[6]) or '0') >= quota then
  redis.call('DEL', KEYS[3])
  return 1
end
redis.call('HSET', KEYS[2], 'status', 'queued', 'created_at', ARGV[3], 'updated_at', ARGV[3],
           'deliveries', 0, 'meta', ARGV[4], 'tenant', ARGV[6], 'lane', ARGV[8])
local id = redis.call('XADD', KEYS[1], '*', 'job_id', ARGV[2], 'tenant', ARGV[6])
redis.call('HSET', KEYS[2], 'stream_id', id)
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('HINCRBY', KEYS[4], ARGV[6], 1)
return id
"""


class Admission:
    def __init__(self, client: aioredis.Redis, settings: QueueSettings, keys: QueueKeys, blobs: Blobs) -> None:
        self._client = client
        self._settings = settings
        self._keys = keys
        self._blobs = blobs
        self._submit = client.register_script(_SUBMIT)

    def tenant_quota(self, tenant: str) -> int | None:
        settings = self._settings
        return settings.tenant_quotas.get(tenant, settings.tenant_max_pending)

    @redis_errors
    async def submit(self, files: Sequence[tuple[str, bytes]], meta: dict[str, Any], *, tenant: str) -> Job:
        """Store the upload and enqueue it for ``tenant``; QueueFull when ``max_pending`` jobs are queued or running
        for this model (its lane), or the tenant's quota of them over all models."""
        settings, keys = self._settings, self._keys
        quota = self.tenant_quota(tenant)
        retry, after = f"retry in {settings.retry_after_s} s", settings.retry_after_s
        full = QueueFull(f"the queue holds its maximum of {settings.max_pending} jobs; {retry}", after)
        over_quota = QueueFull(f"this tenant has its quota of {quota} jobs queued or running; {retry}", after)
        # Cheap early answers so a full queue does not cost an upload to Redis; the script decides.
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.stream)
            pipe.hget(keys.tenants, tenant)
            length, held = await pipe.execute()
        if length >= settings.max_pending:
            raise full
        if quota is not None and int(held or 0) >= quota:
            raise over_quota
        meta_json = json.dumps(meta, separators=(",", ":"))
        job_id = new_job_id()
        stamp = now()
        # The payload exists before the entry does, so no worker can see the entry without it.
        await self._blobs.store_packed(keys.payload_key(job_id), files, settings.payload_ttl_s)
        entry = await self._submit(
            keys=[keys.stream, keys.record_key(job_id), keys.payload_key(job_id), keys.tenants],
            args=[settings.max_pending, job_id, stamp, meta_json, keys.record_ttl, tenant, quota or 0, keys.lane],
        )
        if entry == 0:
            raise full
        if entry == 1:
            raise over_quota
        created = datetime.fromisoformat(stamp)
        return Job(id=job_id, status="queued", created_at=created, updated_at=created, deliveries=0)
