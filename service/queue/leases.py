"""Leases: handing entries to a worker, marking their jobs running, and keeping track of who owns each one.

Why: delivery is at least once, so a job's entry is owned by one consumer at a time and everything that consumer
does to it (keep it alive, hand it back, leave the group) must check it still owns it. A worker that lost an entry
to the janitor must not claim it back, and a worker leaving on scale-down must not take entries with it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service.config import QueueSettings
from service.queue.admission import RELEASE_SLOT_LUA
from service.queue.connection import redis_errors, text
from service.queue.keys import JOB_ID_RE, QueueKeys, now
from service.queue.stream import ACK_LUA, Stream


@dataclass(frozen=True)
class Delivery:
    job_id: str
    entry_id: str
    deliveries: int  # how many times this entry has been delivered, including this one
    meta: dict[str, Any]
    lane: str = ""  # the stream it came from: the model it is for (service.queue.keys)
    tenant: str = ""  # from the entry, which outlives an expired record


# KEYS: stream, record, payload, tenants. ARGV: group, entry_id, consumer, deliveries, now, record_ttl, channel,
# expired_message, tenant (from the entry: the record may have expired). Returns the job's meta when it may run,
# nil when the entry was dropped.
_START = (
    ACK_LUA
    + RELEASE_SLOT_LUA
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  -- The record expired (its slot is still counted) or was deleted (delete() removed the entry and the slot).
  local expired = #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) > 0
  ack(KEYS[1], ARGV[1], ARGV[2])
  redis.call('DEL', KEYS[3])
  if expired then release_slot(KEYS[4], ARGV[9]) end
  return false
end
local status = redis.call('HGET', KEYS[2], 'status')
if status == 'succeeded' or status == 'failed' then
  ack(KEYS[1], ARGV[1], ARGV[2])
  return false
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[2], 'status', 'failed', 'updated_at', ARGV[5], 'error_code', 'unavailable',
             'error_message', ARGV[8])
  redis.call('HDEL', KEYS[2], 'consumer')
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  ack(KEYS[1], ARGV[1], ARGV[2])
  release_slot(KEYS[4], redis.call('HGET', KEYS[2], 'tenant'))
  redis.call('PUBLISH', ARGV[7], 'failed')
  return false
end
redis.call('HSET', KEYS[2], 'status', 'running', 'consumer', ARGV[3], 'deliveries', ARGV[4],
           'updated_at', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return redis.call('HGET', KEYS[2], 'meta')
"""
)

# KEYS: stream. ARGV: group, consumer, entry ids... Only entries this consumer still owns: after a
# janitor took one over, the old owner must not claim it back.
_HEARTBEAT = """
local kept = 0
for i = 3, #ARGV do
  local owned = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #owned > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
"""

# KEYS: stream, records... ARGV: group, consumer, idle_ms, now, record_ttl, entry ids (one per record).
# JUSTID keeps the delivery counter: a handed-back delivery counts, so a job that keeps crashing its
# workers (who release it after an unexpected error) still reaches max_deliveries and the dead letters.
_RELEASE = """
local released = 0
for i = 2, #KEYS do
  local id = ARGV[i + 4]
  local owned = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])
  if #owned > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'JUSTID')
    if redis.call('HGET', KEYS[i], 'status') == 'running' then
      redis.call('HSET', KEYS[i], 'status', 'queued', 'updated_at', ARGV[4])
      redis.call('HDEL', KEYS[i], 'consumer')
      redis.call('EXPIRE', KEYS[i], ARGV[5])
    end
    released = released + 1
  end
end
return released
"""

# KEYS: stream. ARGV: group, consumer. XGROUP DELCONSUMER drops the consumer's pending entries with
# it, so only a consumer that owns none is removed.
_FORGET_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class Leases:
    def __init__(self, client: aioredis.Redis, settings: QueueSettings, keys: QueueKeys, stream: Stream) -> None:
        self._client = client
        self._settings = settings
        self._keys = keys
        self._stream = stream
        self._start = client.register_script(_START)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._release = client.register_script(_RELEASE)
        self._forget_consumer = client.register_script(_FORGET_CONSUMER)

    async def begin(self, consumer: str, entry_id: str, job_id: str, deliveries: int, tenant: str) -> Delivery | None:
        """Mark the job running for ``consumer``; None (entry dropped) when its record or payload is gone."""
        keys = self._keys
        meta = await self._start(
            keys=[keys.stream, keys.record_key(job_id), keys.payload_key(job_id), keys.tenants],
            args=[
                keys.group,
                entry_id,
                consumer,
                deliveries,
                now(),
                keys.record_ttl,
                keys.channel(job_id),
                f"the upload expired after waiting longer than {self._settings.payload_ttl_s} s in the queue; "
                "submit it again",
                tenant,
            ],
        )
        if meta is None:
            return None
        try:
            parsed = json.loads(meta)
        except ValueError:
            parsed = {}
        return Delivery(job_id, entry_id, deliveries, parsed, lane=keys.lane or "", tenant=tenant)

    @redis_errors
    async def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """New entries of this lane for ``consumer`` (``read_lanes`` with one lane)."""
        return await read_lanes([self], consumer, count, block_ms)

    @redis_errors
    async def heartbeat(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        """Renew the leases of this consumer's in-flight entries (their idle time, back to zero) so the janitor
        leaves them alone for another ``lease_s``.

        JUSTID: the delivery counter is not bumped. Entries another consumer has taken over are skipped.
        """
        if deliveries:
            await self._heartbeat(
                keys=[self._keys.stream], args=[self._keys.group, consumer, *(d.entry_id for d in deliveries)]
            )

    @redis_errors
    async def release(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        """Graceful shutdown: hand unfinished entries back so the next janitor run takes them at once."""
        if not deliveries:
            return
        keys = self._keys
        idle_ms = int(self._settings.lease_s * 1000) * 2 + 1000  # past the lease: the next janitor run takes it
        await self._release(
            keys=[keys.stream, *(keys.record_key(d.job_id) for d in deliveries)],
            args=[keys.group, consumer, idle_ms, now(), keys.record_ttl, *(d.entry_id for d in deliveries)],
        )

    @redis_errors
    async def forget_consumer(self, consumer: str) -> bool:
        """XGROUP DELCONSUMER after release() on scale-down, unless it still owns entries (they would be lost)."""
        return bool(await self._forget_consumer(keys=[self._keys.stream], args=[self._keys.group, consumer]))


@redis_errors
async def read_lanes(lanes: Sequence[Leases], consumer: str, count: int, block_ms: int) -> list[Delivery]:
    """New entries for ``consumer`` from the streams of several lanes in one XREADGROUP, at most ``count`` in all, so
    a worker holding several models blocks once and never takes more jobs than it has room for. ``block_ms`` <= 0
    returns at once (Redis reads BLOCK 0 as forever); the client's socket timeout must exceed ``block_ms``."""
    if not lanes:
        return []
    by_stream = {lease._keys.stream: lease for lease in lanes}
    client, group = lanes[0]._client, lanes[0]._keys.group
    block = block_ms if block_ms > 0 else None
    try:
        response = await client.xreadgroup(group, consumer, dict.fromkeys(by_stream, ">"), count=count, block=block)
    except ResponseError as exc:
        if "NOGROUP" not in str(exc):
            raise
        for lease in lanes:  # a Redis restarted without persistence lost the groups: make them, read again
            await lease._stream.ensure_group()
        response = await client.xreadgroup(group, consumer, dict.fromkeys(by_stream, ">"), count=count, block=block)
    deliveries: list[Delivery] = []
    streams = response.items() if isinstance(response, dict) else (response or [])
    for raw_stream, stream_entries in streams:
        lease = by_stream.get(text(raw_stream) or "")
        if lease is None:
            continue
        if isinstance(stream_entries, list) and stream_entries and isinstance(stream_entries[0], list):
            stream_entries = stream_entries[0]  # RESP3 maps a stream to [entries]
        for raw_id, fields in stream_entries or []:
            entry_id = text(raw_id)
            assert entry_id is not None
            fields = fields or {}
            job_id = text(fields.get(b"job_id") or fields.get("job_id"))
            tenant = text(fields.get(b"tenant") or fields.get("tenant")) or ""
            if not job_id or not JOB_ID_RE.fullmatch(job_id):
                await lease._stream.drop_entry(entry_id)  # not written by submit(): nothing to run
                continue
            delivery = await lease.begin(consumer, entry_id, job_id, 1, tenant)
            if delivery is not None:
                deliveries.append(delivery)
    return deliveries
