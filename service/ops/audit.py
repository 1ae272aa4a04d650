"""The audit log: who submitted, read, fetched or deleted which job, and who was turned away.

Each event is one JSON line on the ``c2p.audit`` logger (what a log pipeline collects) and, unless switched off,
an entry in the capped Redis stream ``{prefix}:audit`` that every gateway replica writes to, so one place answers
"who fetched job X". Events carry job ids, tenants, credential ids and the API, never file names, headers or
pixels: the log must not become a second copy of patient data. A Redis failure loses the stream entry, not the log
line and not the request.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.auth import Principal
from service.config import Settings

log = logging.getLogger("c2p.audit")

Action = Literal["submit", "read", "fetch", "delete", "infer", "denied"]


def event(
    action: Action, principal: Principal | None, api: str, job_id: str | None = None, **detail: str | int
) -> dict[str, str | int]:
    record: dict[str, str | int] = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "action": action}
    record["api"] = api
    if principal is not None:
        record.update(tenant=principal.tenant, subject=principal.subject, method=principal.method)
    if job_id is not None:
        record["job_id"] = job_id
    record.update(detail)
    return record


class AuditLog:
    def __init__(self, client: aioredis.Redis | None, settings: Settings) -> None:
        self._client = client
        self._stream = f"{settings.queue.prefix}:audit"
        self._max_len = settings.auth.audit_stream_max_len

    async def record(
        self, action: Action, principal: Principal | None, api: str, job_id: str | None = None, **detail: str | int
    ) -> None:
        entry = event(action, principal, api, job_id, **detail)
        log.info("%s", json.dumps(entry, separators=(",", ":")))
        if self._client is None or self._max_len == 0:
            return
        try:
            await self._client.xadd(
                self._stream, {k: str(v) for k, v in entry.items()}, maxlen=self._max_len, approximate=True
            )
        except (RedisError, OSError) as exc:
            log.warning("audit stream not written (the log line above stands): %s", type(exc).__name__)
