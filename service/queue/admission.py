"""Admission: whether a job gets into the queue (the queue's cap, the tenant's quota) and, if so, enqueuing it.

Why one module: the caps are what keeps one tenant, or a burst, from filling Redis with uploads, and both are
decided in the same atomic step that enqueues, so concurrent submits cannot overshoot either. The tenant counter
this step raises is lowered by whichever script ends the job; ``RELEASE_SLOT_LUA`` is that half, kept here next to
the half that takes a slot so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis

from service.config import QueueSettings
from service.errors import JobNotFound, QueueFull, Unavailable
from service.inputs.spool import Data, pieces
from service.queue.blobs import Blobs
from service.queue.connection import redis_errors, text
from service.queue.keys import QueueKeys, new_job_id, now
from service.queue.memory import budget_for
from service.schema import Job

# How admission reads the job a repeat names (Records.get; records.py imports this module for RELEASE_SLOT_LUA).
Lookup = Callable[..., Awaitable[Job]]

# Prepended (after ``ACK_LUA``) to every script that ends a job queued or running: gives its tenant's slot back.
RELEASE_SLOT_LUA = """local function release_slot(tenants, tenant)
  if tenant and tenant ~= '' then
    if redis.call('HINCRBY', tenants, tenant, -1) <= 0 then
      redis.call('HDEL', tenants, tenant)
    end
  end
end
"""

# The job an idempotency key (or an upload's digest) names while it lives and has not failed; marked ``shared`` so
# that a caller who stops waiting does not delete it under the other (records.py: delete_if_queued).
_REPEAT_LUA = """local function repeat_of(key, prefix)
  local same = redis.call('GET', key)
  if not same then return false end
  local status = redis.call('HGET', prefix .. same, 'status')
  if not status or status == 'failed' then return false end
  redis.call('HINCRBY', prefix .. same, 'shared', 1)
  return same
end
"""

# KEYS: stream, record, payload, tenants, idempotency. ARGV: max_pending, job_id, now, meta, record_ttl, tenant,
# tenant_max (0: no per-tenant cap), lane (the stream's, kept in the record so a delete finds the entry),
# idempotency_ttl_ms (0: none), record prefix. Returns the entry id; 0 (queue full) / 1 (the tenant's quota full);
# or {job_id} of the job the idempotency key already names (one still alive and not failed). The checks and the
# XADD are one atomic step, so concurrent submits cannot overshoot either cap nor make two jobs of one key; a
# submit run twice (a client retrying a command whose answer it lost) finds its own record and changes nothing.
_SUBMIT = (
    _REPEAT_LUA
    + """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return redis.call('HGET', KEYS[2], 'stream_id')
end
local same = repeat_of(KEYS[5], ARGV[10])
if same then
  redis.call('DEL', KEYS[3])
  return {same}
end
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
if tonumber(ARGV[9]) > 0 then
  redis.call('SET', KEYS[5], ARGV[2], 'PX', ARGV[9])
end
return id
"""
)

# KEYS: idempotency. ARGV: record prefix. The job a repeat names, before its upload is stored (nil: none).
_REPEAT = _REPEAT_LUA + "return repeat_of(KEYS[1], ARGV[1])"

# What makes two submits the same job when no key is given: the files and every option that changes the job.
_NOT_IDENTITY = frozenset({"submitted_at", "trace"})


def upload_digest(files: Sequence[tuple[str, Data]], meta: dict[str, Any]) -> str:
    """sha256 over the job's options and files (names and bytes): equal only for a repeat of the same request."""
    digest = hashlib.sha256()
    options = {k: v for k, v in meta.items() if k not in _NOT_IDENTITY}
    digest.update(json.dumps(options, sort_keys=True, separators=(",", ":"), default=str).encode())
    for name, data in files:
        digest.update(b"\0%d\0%s\0%d\0" % (len(name), name.encode(errors="surrogateescape"), len(data)))
        for piece in pieces(data):
            digest.update(piece)
    return digest.hexdigest()


class Admission:
    def __init__(
        self, client: aioredis.Redis, settings: QueueSettings, keys: QueueKeys, blobs: Blobs, lookup: Lookup
    ) -> None:
        self._client = client
        self._settings = settings
        self._keys = keys
        self._blobs = blobs
        self._lookup = lookup
        self._budget = budget_for(client, settings)
        self._submit = client.register_script(_SUBMIT)
        self._repeat = client.register_script(_REPEAT)

    def tenant_quota(self, tenant: str) -> int | None:
        settings = self._settings
        return settings.tenant_quotas.get(tenant, settings.tenant_max_pending)

    @redis_errors
    async def submit(
        self,
        files: Sequence[tuple[str, Data]],
        meta: dict[str, Any],
        *,
        tenant: str,
        idempotency_key: str | None = None,
        dedupe: bool = True,
        result_bytes: int = 0,
    ) -> Job:
        """Store the upload and enqueue it for ``tenant``; QueueFull when ``max_pending`` jobs are queued or running
        for this model (its lane), or the tenant's quota of them over all models.

        The same ``idempotency_key`` (per tenant, for the record's lifetime), or without one the same upload within
        ``dedupe_window_s`` (unless ``dedupe`` is off), answers with the job it made first, unless that one failed.
        Admitted by bytes too (service/queue/memory.py): the upload plus ``result_bytes`` (what its result and kept
        outputs will take) must fit Redis's budget, else StorageFull before anything is stored."""
        settings, keys = self._settings, self._keys
        same, same_ttl_ms = await self._repeat_key(files, meta, tenant, idempotency_key, dedupe)
        quota = self.tenant_quota(tenant)
        retry, after = f"retry in {settings.retry_after_s} s", settings.retry_after_s
        full = QueueFull(f"the queue holds its maximum of {settings.max_pending} jobs; {retry}", after)
        over_quota = QueueFull(f"this tenant has its quota of {quota} jobs queued or running; {retry}", after)
        # Cheap early answers so a repeat or a full queue does not cost an upload to Redis; the script decides.
        if same_ttl_ms and (first := await self._repeat(keys=[same], args=[keys.record_key("")])):
            existing = await self._existing(text(first), tenant)
            if existing is not None:
                return existing
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
        needed = sum(len(data) for _, data in files) + result_bytes
        async with self._budget.reserve(needed):
            # The payload exists before the entry does, so no worker can see the entry without it.
            await self._blobs.store_packed(keys.payload_key(job_id), files, settings.payload_ttl_s)
            entry = await self._submit(
                keys=[keys.stream, keys.record_key(job_id), keys.payload_key(job_id), keys.tenants, same],
                args=[
                    settings.max_pending,
                    job_id,
                    stamp,
                    meta_json,
                    keys.record_ttl,
                    tenant,
                    quota or 0,
                    keys.lane,
                    same_ttl_ms,
                    keys.record_key(""),
                ],
            )
        if isinstance(entry, list):  # a concurrent repeat made the job first
            existing = await self._existing(text(entry[0]), tenant)
            if existing is not None:
                return existing
            raise Unavailable("the job this request repeats ended while it was looked up; send it again")
        if entry == 0:
            raise full
        if entry == 1:
            raise over_quota
        created = datetime.fromisoformat(stamp)
        return Job(id=job_id, status="queued", created_at=created, updated_at=created, deliveries=0)

    async def _repeat_key(
        self,
        files: Sequence[tuple[str, Data]],
        meta: dict[str, Any],
        tenant: str,
        idempotency_key: str | None,
        dedupe: bool,
    ) -> tuple[str, int]:
        """The key naming the job a repeat of this submit gets, and how long it names it (ms; 0: never set)."""
        keys, window_s = self._keys, self._settings.dedupe_window_s
        if idempotency_key is not None:
            return keys.idempotency_key(tenant, f"key:{idempotency_key}"), keys.record_ttl * 1000
        if dedupe and window_s > 0:
            digest = await asyncio.to_thread(upload_digest, files, meta)
            return keys.idempotency_key(tenant, f"upload:{digest}"), int(window_s * 1000)
        return keys.idempotency_key(tenant, "never-set"), 0

    async def _existing(self, job_id: str | None, tenant: str) -> Job | None:
        """The job a repeated submit names, while it lives and has not failed."""
        if not job_id:
            return None
        try:
            job = await self._lookup(job_id, tenant=tenant)
        except JobNotFound:
            return None
        return None if job.status == "failed" else job
