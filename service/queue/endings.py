"""Ending a job: storing its result or its failure, acknowledging its entry and telling waiters, in one step.

Why one module: at-least-once delivery means two workers may finish the same job, and a crash or failover
between two commands must not leave a stored result with the job still "running", an acknowledged entry without
a result, or a deleted job resurrected by a late worker. Both endings are therefore one script each, and terminal
states are final: the first of succeeded/failed wins, later writers are told so.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from service.config import QueueSettings
from service.errors import ServiceError
from service.queue.admission import RELEASE_SLOT_LUA
from service.queue.connection import redis_errors
from service.queue.keys import DEAD_LETTER_MAXLEN, QueueKeys, now
from service.queue.leases import Delivery
from service.queue.stream import ACK_LUA

# Both endings start alike: a job whose record is gone, or that has ended already, only has its entry acknowledged
# (the first terminal state is final). A record that expired while its entry still waited leaves its tenant's slot
# taken (a delete removes entry and slot together): the entry's tenant, the last ARGV, gets it back. KEYS[1]
# stream, KEYS[2] record, KEYS[5] tenants; ARGV[1] group, ARGV[2] entry id, ARGV[#ARGV] the entry's tenant.
_ONCE = (
    ACK_LUA
    + RELEASE_SLOT_LUA
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  if #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) > 0 then release_slot(KEYS[5], ARGV[#ARGV]) end
  ack(KEYS[1], ARGV[1], ARGV[2])
  return 0
end
local status = redis.call('HGET', KEYS[2], 'status')
if status == 'succeeded' or status == 'failed' then
  ack(KEYS[1], ARGV[1], ARGV[2])
  return 0
end
"""
)

# KEYS: stream, record, payload, result, tenants. ARGV: group, entry_id, result_json, result_ttl, now, record_ttl,
# channel, tenant. The result is stored before the entry is acknowledged, in one step.
_COMPLETE = (
    _ONCE
    + """if not redis.call('SET', KEYS[4], ARGV[3], 'NX', 'EX', ARGV[4]) then
  ack(KEYS[1], ARGV[1], ARGV[2])
  return 0
end
redis.call('HSET', KEYS[2], 'status', 'succeeded', 'updated_at', ARGV[5])
redis.call('HDEL', KEYS[2], 'consumer')
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('DEL', KEYS[3])
ack(KEYS[1], ARGV[1], ARGV[2])
release_slot(KEYS[5], redis.call('HGET', KEYS[2], 'tenant'))
redis.call('PUBLISH', ARGV[7], 'succeeded')
return 1
"""
)

# KEYS: stream, record, payload, dead, tenants. ARGV: group, entry_id, code, message, now, record_ttl, channel,
# job_id, deliveries, dead_letter ('1' or '0'), dead_maxlen, tenant.
_FAIL = (
    _ONCE
    + """redis.call('HSET', KEYS[2], 'status', 'failed', 'updated_at', ARGV[5], 'error_code', ARGV[3],
           'error_message', ARGV[4], 'deliveries', ARGV[9])
redis.call('HDEL', KEYS[2], 'consumer')
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('DEL', KEYS[3])
ack(KEYS[1], ARGV[1], ARGV[2])
release_slot(KEYS[5], redis.call('HGET', KEYS[2], 'tenant'))
if ARGV[10] == '1' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[11], '*', 'job_id', ARGV[8], 'error_code', ARGV[3],
             'error_message', ARGV[4], 'deliveries', ARGV[9])
end
redis.call('PUBLISH', ARGV[7], 'failed')
return 1
"""
)


class Endings:
    def __init__(self, client: aioredis.Redis, settings: QueueSettings, keys: QueueKeys) -> None:
        self._settings = settings
        self._keys = keys
        self._complete = client.register_script(_COMPLETE)
        self._fail = client.register_script(_FAIL)

    async def complete(self, delivery: Delivery, result_json: str) -> bool:
        """Store the result, mark the job succeeded, acknowledge, notify: one atomic step.

        False when nothing was stored: a duplicate delivery finished first (its result is kept), the job
        already failed, or it was deleted.
        """
        keys, job_id = self._keys, delivery.job_id
        stored = await self._complete(
            keys=[
                keys.stream,
                keys.record_key(job_id),
                keys.payload_key(job_id),
                keys.result_key(job_id),
                keys.tenants,
            ],
            args=[
                keys.group,
                delivery.entry_id,
                result_json,
                self._settings.result_ttl_s,
                now(),
                keys.record_ttl,
                keys.channel(job_id),
                delivery.tenant,
            ],
        )
        return bool(stored)

    @redis_errors
    async def fail(self, delivery: Delivery, error: ServiceError) -> None:
        """Final failure: input errors are not retried; the service's own (a timeout, the delivery limit) also go to
        the dead letters, for an operator. Never overwrites a job that already ended."""
        await self.finish_failed(delivery, error, dead_letter=error.http_status >= 500)

    async def finish_failed(self, delivery: Delivery, error: ServiceError, dead_letter: bool) -> None:
        """Fail the job; with ``dead_letter`` a copy of the failure goes to the dead-letter stream too."""
        keys, job_id = self._keys, delivery.job_id
        await self._fail(
            keys=[keys.stream, keys.record_key(job_id), keys.payload_key(job_id), keys.dead, keys.tenants],
            args=[
                keys.group,
                delivery.entry_id,
                error.code,
                error.message,
                now(),
                keys.record_ttl,
                keys.channel(job_id),
                job_id,
                delivery.deliveries,
                "1" if dead_letter else "0",
                DEAD_LETTER_MAXLEN,
                delivery.tenant,
            ],
        )
