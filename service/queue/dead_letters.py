"""Dead letters: what a job that keeps failing leaves behind, so that when it is given up it can say why.

Why: Redis counts deliveries per entry, and past ``max_deliveries`` the job fails with ``delivery_limit`` and a
copy goes to the dead-letter stream. By then the workers that saw it fail are often gone (crashed, hung, scaled
away), so each transient error is remembered on the record as it happens, and the dead letter is written from
that trail, or says that nothing was recorded, which itself points at a worker that died or hung.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from service.config import QueueSettings
from service.errors import DeliveryLimit
from service.queue.connection import redis_errors, text
from service.queue.endings import Endings
from service.queue.keys import QueueKeys, now
from service.queue.leases import Delivery

# KEYS: record. ARGV: code, message, now, record_ttl. Never creates a record that was deleted.
_NOTE_ERROR = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'last_error_code', ARGV[1], 'last_error_message', ARGV[2], 'updated_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


class DeadLetters:
    def __init__(self, client: aioredis.Redis, settings: QueueSettings, keys: QueueKeys, endings: Endings) -> None:
        self._client = client
        self._settings = settings
        self._keys = keys
        self._endings = endings
        self._note_error = client.register_script(_NOTE_ERROR)

    @redis_errors
    async def note_error(self, delivery: Delivery, error_code: str, message: str) -> None:
        """Remember a transient error so that a later DeliveryLimit can say what went wrong."""
        await self._note_error(
            keys=[self._keys.record_key(delivery.job_id)], args=[error_code, message, now(), self._keys.record_ttl]
        )

    async def dead_letter(self, entry_id: str, job_id: str, attempts: int, tenant: str) -> None:
        """Fail the job with DeliveryLimit, naming its last recorded error, and keep a copy in the dead letters."""
        code, message = await self._client.hmget(
            self._keys.record_key(job_id), ["last_error_code", "last_error_message"]
        )
        if code or message:
            last = f"the last error was {text(code) or 'internal'}: {text(message) or ''}"
        else:
            last = "no error was recorded, so its worker most likely died or hung on it"
        error = DeliveryLimit(
            f"the job was delivered {attempts} times (the limit is {self._settings.max_deliveries}) "
            f"without finishing; {last}"
        )
        delivery = Delivery(job_id, entry_id, attempts, {}, lane=self._keys.lane or "", tenant=tenant)
        await self._endings.finish_failed(delivery, error, dead_letter=True)
