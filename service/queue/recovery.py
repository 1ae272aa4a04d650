"""The janitor: taking over entries whose worker is presumed dead, so no job waits forever on a lost worker.

Why: a worker can vanish mid-job (OOM kill, node loss) without acknowledging, and only Redis knows how long its
entries have sat idle. A live worker renews its entries every heartbeat (leases: their idle time back to zero), so
an entry idle longer than the lease (``lease_s``, a few heartbeats) has lost its worker and is claimed by a live
one within seconds of the kill; no per-job keys, and Redis's own clock decides, not the workers'. A job claimed too
often is not run again but handed to the dead letters, so one poisonous upload cannot crash workers forever.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from service.config import QueueSettings
from service.queue.connection import redis_errors, text
from service.queue.dead_letters import DeadLetters
from service.queue.keys import JOB_ID_RE, QueueKeys
from service.queue.leases import Delivery, Leases
from service.queue.stream import Stream

# KEYS: stream. ARGV: group, consumer, min_idle_ms, count. Returns {entry_id, job_id, deliveries, tenant} per
# claimed entry. XPENDING IDLE + XCLAIM rather than XAUTOCLAIM because Redis 6.2's XAUTOCLAIM returns
# deleted-but-pending entries as nil without their id, so they could never be acknowledged.
_CLAIM = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4])
local out = {}
for _, p in ipairs(pending) do
  local id = p[1]
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], id)
  if #claimed > 0 then
    local entry = claimed[1]
    local job_id = false
    local tenant = ''
    if entry then
      local fields = entry[2]
      for j = 1, #fields, 2 do
        if fields[j] == 'job_id' then job_id = fields[j + 1] end
        if fields[j] == 'tenant' then tenant = fields[j + 1] end
      end
    end
    if job_id then
      table.insert(out, {id, job_id, tonumber(p[4]) + 1, tenant})
    else
      redis.call('XACK', KEYS[1], ARGV[1], id)
      if entry then redis.call('XDEL', KEYS[1], id) end
    end
  end
end
return out
"""


class Recovery:
    def __init__(
        self,
        client: aioredis.Redis,
        settings: QueueSettings,
        keys: QueueKeys,
        stream: Stream,
        leases: Leases,
        dead_letters: DeadLetters,
    ) -> None:
        self._settings = settings
        self._keys = keys
        self._stream = stream
        self._leases = leases
        self._dead_letters = dead_letters
        self._claim = client.register_script(_CLAIM)

    @redis_errors
    async def reclaim(self, consumer: str, count: int = 16) -> list[Delivery]:
        """The janitor: take over entries whose lease lapsed (idle longer than ``lease_s``: their worker is gone).

        A job past ``max_deliveries`` is failed with DeliveryLimit and dead-lettered instead of returned.
        """
        keys = self._keys
        min_idle_ms = max(1, int(self._settings.lease_s * 1000))
        claimed = await self._stream.with_group(
            lambda: self._claim(keys=[keys.stream], args=[keys.group, consumer, min_idle_ms, count])
        )
        out: list[Delivery] = []
        for raw_id, raw_job, deliveries, raw_tenant in claimed or []:
            entry_id, job_id, deliveries = text(raw_id), text(raw_job), int(deliveries)
            tenant = text(raw_tenant) or ""
            assert entry_id is not None and job_id is not None
            if not JOB_ID_RE.fullmatch(job_id):
                await self._stream.drop_entry(entry_id)
                continue
            if deliveries > self._settings.max_deliveries:
                await self._dead_letters.dead_letter(entry_id, job_id, deliveries - 1, tenant)
                continue
            delivery = await self._leases.begin(consumer, entry_id, job_id, deliveries, tenant)
            if delivery is not None:
                out.append(delivery)
        return out
