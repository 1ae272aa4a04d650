"""The job as its caller sees it: reading the record (with its tenant check), waiting for it to end, deleting it.

Why apart from the worker side: these are the gateway's reads, and they carry the rules the APIs promise. Another
tenant's job answers the same 404 as an id that never existed, so ids reveal nothing across tenants; waiting can
never miss the end of a job; a deletion takes every key of the job with it, whatever state it is in, so patient
data does not outlive a delete and a late worker cannot bring the job back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.errors import JobNotFound, ServiceError
from service.queue.admission import RELEASE_SLOT_LUA
from service.queue.connection import redis_errors, text
from service.queue.keys import QueueKeys, check_id, new_job_id, now
from service.queue.stream import ACK_LUA
from service.schema import ErrorInfo, Forwarding, Job, SegmentationResult

TERMINAL = frozenset({"succeeded", "failed"})
# wait(): re-read the status this often even without a message (lost message, pub/sub reconnect).
WAIT_POLL_S = 0.5

# Whatever state the job is in, its entry goes too: a queued job is never delivered, a running one's worker
# finds the record gone.
# KEYS: stream, record, payload, result, outputs, tenants. ARGV: group, channel, required status ("" = any),
# tenant ("" = any: another tenant's job is gone as far as the caller can tell). 0 gone, 2 wrong status.
_DELETE = (
    ACK_LUA
    + RELEASE_SLOT_LUA
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
local tenant = redis.call('HGET', KEYS[2], 'tenant')
if ARGV[4] ~= '' and tenant ~= ARGV[4] then
  return 0
end
local status = redis.call('HGET', KEYS[2], 'status')
if ARGV[3] ~= '' and status ~= ARGV[3] then
  return 2
end
-- A caller that stopped waiting does not delete a job a repeated submit also answered with: that one still waits.
if ARGV[3] ~= '' and redis.call('HEXISTS', KEYS[2], 'shared') == 1 then
  return 2
end
if status ~= 'succeeded' and status ~= 'failed' then
  release_slot(KEYS[6], tenant)
end
local id = redis.call('HGET', KEYS[2], 'stream_id')
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
if id then
  redis.pcall('XACK', KEYS[1], ARGV[1], id)
  redis.call('XDEL', KEYS[1], id)
end
redis.call('PUBLISH', ARGV[2], 'deleted')
return 1
"""
)

# KEYS: record. ARGV: field, value. Never creates a record that was deleted.
_SET_FIELD = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class Records:
    def __init__(self, client: aioredis.Redis, keys: QueueKeys) -> None:
        self._client = client
        self._keys = keys
        self._delete = client.register_script(_DELETE)
        self._set_field = client.register_script(_SET_FIELD)

    @redis_errors
    async def create_failed(self, tenant: str, meta: dict[str, Any], error: ServiceError) -> Job:
        """A job that failed before it could be queued (a series assembled from several requests that is not one
        volume): its record alone, so the caller finds the error where it looks for the result."""
        job_id = new_job_id()
        stamp = now()
        key = self._keys.record_key(job_id)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "status": "failed",
                    "created_at": stamp,
                    "updated_at": stamp,
                    "deliveries": 0,
                    "meta": json.dumps(meta, separators=(",", ":")),
                    "tenant": tenant,
                    "error_code": error.code,
                    "error_message": error.message,
                },
            )
            pipe.expire(key, self._keys.record_ttl)
            await pipe.execute()
        return await self.get(job_id, tenant=tenant)

    @redis_errors
    async def get(self, job_id: str, *, tenant: str | None = None) -> Job:
        """The job as it stands; JobNotFound for another ``tenant``'s job (None: any tenant, for workers)."""
        check_id(job_id)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._keys.record_key(job_id))
            pipe.get(self._keys.result_key(job_id))
            fields, result_json = await pipe.execute()
        if not fields:
            raise JobNotFound("job not found (unknown, expired or deleted)")
        record = {text(k): text(v) for k, v in fields.items()}
        if tenant is not None and record.get("tenant") != tenant:
            raise JobNotFound("job not found (unknown, expired or deleted)")
        status = record.get("status") or "queued"
        created = record.get("created_at") or now()
        result = None
        if status == "succeeded":
            if result_json is None:  # the result expired before the record did
                raise JobNotFound("job not found (unknown, expired or deleted)")
            result = SegmentationResult.model_validate_json(result_json)
        error = None
        if status == "failed":
            error = ErrorInfo(code=record.get("error_code") or "internal", message=record.get("error_message") or "")
        return Job(
            id=job_id,
            status=status,
            created_at=datetime.fromisoformat(created),
            updated_at=datetime.fromisoformat(record.get("updated_at") or created),
            deliveries=int(record.get("deliveries") or 0),
            error=error,
            result=result,
            forwarding=Forwarding.model_validate_json(record["forwarding"]) if record.get("forwarding") else None,
        )

    async def wait(self, job_id: str, timeout_s: float, *, tenant: str | None = None) -> Job:
        """The job as soon as it ends, or as it stands after ``timeout_s``.

        Subscribes before reading the status, so a completion between the two cannot be missed, and
        re-reads every WAIT_POLL_S, so a lost message or a dropped pub/sub connection only delays.
        """
        check_id(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            subscribed = True
            try:
                await pubsub.subscribe(self._keys.channel(job_id))
            except RedisError:
                subscribed = False  # polling alone still answers, only later
            job = await self.get(job_id, tenant=tenant)
            while job.status not in TERMINAL:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return job
                step = min(remaining, WAIT_POLL_S)
                if subscribed:
                    try:
                        await pubsub.get_message(ignore_subscribe_messages=True, timeout=step)
                    except RedisError:
                        subscribed = False
                        await asyncio.sleep(min(step, max(0.0, deadline - loop.time())))
                else:
                    await asyncio.sleep(step)
                job = await self.get(job_id, tenant=tenant)
            return job
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    @redis_errors
    async def delete(self, job_id: str, *, tenant: str | None = None) -> None:
        """Forget a job in any state; a worker still running it drops its result (complete() returns False)."""
        check_id(job_id)
        if await self._delete_when(job_id, "", tenant) == 0:
            raise JobNotFound("job not found (unknown, expired or deleted)")

    @redis_errors
    async def delete_if_queued(self, job_id: str, *, tenant: str | None = None) -> bool:
        """Delete a job only while no worker has started it, atomically; False when it is gone or running.

        For callers that stopped waiting (a deadline, a hang-up): a job already running is left to
        finish, since reading the status and then deleting would race with a worker starting it.
        """
        check_id(job_id)
        return await self._delete_when(job_id, "queued", tenant) == 1

    async def _delete_when(self, job_id: str, status: str, tenant: str | None) -> int:
        keys = self._keys
        # The entry is in the stream of the job's model; a job's lane never changes, so reading it first is no race.
        lane = text(await self._client.hget(keys.record_key(job_id), "lane"))
        if not lane:
            return 0
        return int(
            await self._delete(
                keys=[
                    keys.stream_of(lane),
                    keys.record_key(job_id),
                    keys.payload_key(job_id),
                    keys.result_key(job_id),
                    keys.outputs_key(job_id),
                    keys.tenants,
                ],
                args=[keys.group, keys.channel(job_id), status, tenant or ""],
            )
        )

    @redis_errors
    async def note_forwarding(self, job_id: str, forwarding: Forwarding) -> bool:
        """Record how sending the job's DICOM SEG on is going; False when the job is gone (deleted, expired)."""
        check_id(job_id)
        done = await self._set_field(
            keys=[self._keys.record_key(job_id)], args=["forwarding", forwarding.model_dump_json()]
        )
        return bool(done)
