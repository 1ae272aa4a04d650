"""JobQueue: the one object the gateways and workers hold, built from the queue's parts over one Redis client.

Why a facade: callers think in jobs (submit, wait, read, complete), not in streams, leases and scripts, and they
should not have to know which part keeps which invariant. This class only wires the parts together and forwards;
each method's contract is documented where it is implemented.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from service.config import QueueSettings
from service.errors import JobNotFound, ServiceError
from service.inputs.spool import Data
from service.queue.admission import Admission
from service.queue.assembly import Assembly
from service.queue.blobs import Blobs
from service.queue.connection import ping, redis_errors, text
from service.queue.dead_letters import DeadLetters
from service.queue.endings import Endings
from service.queue.keys import QueueKeys
from service.queue.leases import Delivery, Leases, read_lanes
from service.queue.records import Records
from service.queue.recovery import Recovery
from service.queue.stream import QueueStats, Stream
from service.schema import Forwarding, Job


class JobQueue(QueueKeys):
    """Gateway and worker sides of the queue; one instance per Redis client (decode_responses=False).

    Gateway side: ``Admission`` (submit), ``Records`` (get, wait, delete), ``Blobs`` (kept outputs). Worker side:
    ``Leases`` (read, heartbeat, release), ``Blobs`` (the upload), ``Endings`` (complete, fail), ``DeadLetters``
    (note_error), ``Recovery`` (reclaim). ``Stream`` creates and measures the group. The key names are inherited.

    Every model artifact has its own stream (its lane, service.queue.keys); what touches a stream needs a queue bound
    to that lane (``for_lane``), everything keyed by job id works on any.
    """

    def __init__(self, client: aioredis.Redis, settings: QueueSettings, lane: str | None = None) -> None:
        super().__init__(settings, lane)
        self._client = client
        self._lanes: dict[str, JobQueue] = {}
        self._group_made = False
        self.settings = settings
        self._stream = Stream(client, self)
        self._blobs = Blobs(client, settings, self)
        self._records = Records(client, self)
        self._admission = Admission(client, settings, self, self._blobs, self._records.get)
        self._leases = Leases(client, settings, self, self._stream)
        self._endings = Endings(client, settings, self)
        self._dead_letters = DeadLetters(client, settings, self, self._endings)
        self._recovery = Recovery(client, settings, self, self._stream, self._leases, self._dead_letters)
        self.assembly = Assembly(client, settings, self)  # STOW-RS series collected over several requests

    def for_lane(self, lane: str) -> JobQueue:
        """This queue bound to ``lane``'s stream (one object per lane, kept: its scripts are registered once)."""
        if lane == self.lane:
            return self
        if lane not in self._lanes:
            self._lanes[lane] = JobQueue(self._client, self.settings, lane)
        return self._lanes[lane]

    # -- gateway side ------------------------------------------------------------------------------

    async def ping(self, timeout_s: float = 2.0) -> bool:
        return await ping(self._client, timeout_s)

    def tenant_quota(self, tenant: str) -> int | None:
        return self._admission.tenant_quota(tenant)

    async def submit(
        self,
        files: Sequence[tuple[str, Data]],
        meta: dict[str, Any],
        *,
        tenant: str,
        lane: str | None = None,
        idempotency_key: str | None = None,
        dedupe: bool = True,
        result_bytes: int = 0,
    ) -> Job:
        """Into ``lane``'s stream (the model the job is for); a bound queue's own lane by default."""
        queue = self if lane is None else self.for_lane(lane)
        if not queue._group_made:  # before the first job: an autoscaler reads the group's lag with no worker up
            await queue.ensure_group()
            queue._group_made = True
        return await queue._admission.submit(
            files, meta, tenant=tenant, idempotency_key=idempotency_key, dedupe=dedupe, result_bytes=result_bytes
        )

    @redis_errors
    async def index_series(self, tenant: str, series_uid: str, job_id: str) -> None:
        """Remember ``job_id`` as one of ``tenant``'s jobs for the DICOM series (``jobs_for_series``)."""
        key = self.series_key(tenant, series_uid)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.sadd(key, job_id)
            pipe.expire(key, self.record_ttl)
            await pipe.execute()

    @redis_errors
    async def jobs_for_series(self, tenant: str, series_uid: str) -> list[Job]:
        """``tenant``'s jobs for a DICOM series that still exist, oldest first."""
        ids = sorted(text(i) or "" for i in await self._client.smembers(self.series_key(tenant, series_uid)))
        jobs = []
        for job_id in ids:
            try:
                jobs.append(await self._records.get(job_id, tenant=tenant))
            except JobNotFound:
                continue  # expired or deleted since
        return sorted(jobs, key=lambda j: j.created_at)

    async def create_failed(self, tenant: str, meta: dict[str, Any], error: ServiceError) -> Job:
        return await self._records.create_failed(tenant, meta, error)

    async def get(self, job_id: str, *, tenant: str | None = None) -> Job:
        return await self._records.get(job_id, tenant=tenant)

    async def delete(self, job_id: str, *, tenant: str | None = None) -> None:
        await self._records.delete(job_id, tenant=tenant)

    async def delete_if_queued(self, job_id: str, *, tenant: str | None = None) -> bool:
        return await self._records.delete_if_queued(job_id, tenant=tenant)

    async def outputs(self, job_id: str, wanted: Callable[[str], bool], max_bytes: int) -> dict[str, bytes]:
        return await self._blobs.outputs(job_id, wanted, max_bytes)

    async def wait(self, job_id: str, timeout_s: float, *, tenant: str | None = None) -> Job:
        return await self._records.wait(job_id, timeout_s, tenant=tenant)

    async def stats(self, lane: str | None = None) -> QueueStats:
        queue = self if lane is None else self.for_lane(lane)
        return await queue._stream.stats()

    # -- worker side -------------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        await self._stream.ensure_group()

    async def read(
        self, consumer: str, count: int, block_ms: int, lanes: Sequence[str] | None = None
    ) -> list[Delivery]:
        """New entries from ``lanes`` (default: this queue's own), at most ``count`` over all of them."""
        queues = [self] if lanes is None else [self.for_lane(lane) for lane in lanes]
        return await read_lanes([q._leases for q in queues], consumer, count, block_ms)

    async def reclaim(self, consumer: str, count: int = 16) -> list[Delivery]:
        return await self._recovery.reclaim(consumer, count)

    async def payload(self, delivery: Delivery, max_bytes: int) -> list[tuple[str, bytes]]:
        return await self._blobs.payload(delivery.job_id, max_bytes)

    async def heartbeat(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        await self._leases.heartbeat(consumer, deliveries)

    async def release(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        await self._leases.release(consumer, deliveries)

    async def forget_consumer(self, consumer: str) -> bool:
        return await self._leases.forget_consumer(consumer)

    async def note_error(self, delivery: Delivery, error_code: str, message: str) -> None:
        await self._dead_letters.note_error(delivery, error_code, message)

    async def store_outputs(self, job_id: str, members: Sequence[tuple[str, bytes]]) -> None:
        await self._blobs.store_outputs(job_id, members)

    async def drop_outputs(self, job_id: str) -> None:
        await self._blobs.drop_outputs(job_id)

    async def note_forwarding(self, job_id: str, forwarding: Forwarding) -> bool:
        return await self._records.note_forwarding(job_id, forwarding)

    async def complete(self, delivery: Delivery, result_json: str) -> bool:
        return await self._endings.complete(delivery, result_json)

    async def fail(self, delivery: Delivery, error: ServiceError) -> None:
        await self._endings.fail(delivery, error)
