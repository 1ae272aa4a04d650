"""The job queue: Redis Streams with one consumer group, at-least-once delivery, results stored with a TTL.

Keys under ``settings.prefix`` (``p``)::

    {p}:jobs          stream of {job_id}; consumer group {p}:workers; an entry lives until its job ends
    {p}:dead          dead-letter stream (approximate MAXLEN 10000)
    {p}:job:{id}      record hash: status, created_at, updated_at, deliveries, meta, stream_id, ...
    {p}:payload:{id}  the packed upload (service.payload), TTL payload_ttl_s, deleted when the job ends
    {p}:result:{id}   the result JSON, TTL result_ttl_s
    {p}:outputs:{id}  what the derived formats need beyond the result (service.outputs), packed like a payload,
                      TTL result_ttl_s, written before the job completes; read by ranges, one member at a time
    {p}:done:{id}     pub/sub channel told when the job ends (or is deleted)
    {p}:tenants       hash: tenant -> its jobs queued or running (what the per-tenant quota bounds)

Every job belongs to the tenant that submitted it (the record's ``tenant`` field, also on its stream entry).
Gateway reads and deletes name the caller's tenant and treat another tenant's job as unknown: the answer is the
same 404 as for an id that never existed, so ids reveal nothing across tenants.

Every state change that touches more than one key is a Lua script, because a crash (or a Redis
failover) between two commands must not leave, say, a stored result with a job still "running", an
acknowledged entry without a result, or a deleted job resurrected by a late worker. Entries are
XDEL'd when acknowledged, so XLEN is the number of jobs queued or running and is what ``max_pending``
bounds. Terminal states are final: the first of succeeded/failed wins, later writers are told so.

The janitor (``reclaim``) claims entries whose idle time exceeds the job deadline; a live worker keeps
its long jobs from being claimed with ``heartbeat``. Redis counts deliveries per entry; past
``max_deliveries`` the job fails with ``delivery_limit`` and a copy goes to the dead-letter stream.
Works with Redis >= 6.2 (XPENDING IDLE); ``lag`` in ``stats`` needs Redis >= 7.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError, ResponseError

from service import payload as payload_codec
from service.config import QueueSettings
from service.errors import (
    DeliveryLimit,
    InvalidRequest,
    JobNotFound,
    OutputNotAvailable,
    PayloadTooLarge,
    QueueFull,
    ServiceError,
    Unavailable,
)
from service.schema import ErrorInfo, Forwarding, Job, SegmentationResult

# secrets.token_urlsafe(16): 22 characters of the URL-safe base64 alphabet. Anything else is refused
# before it reaches a key name.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")
DEAD_LETTER_MAXLEN = 10_000
TERMINAL = frozenset({"succeeded", "failed"})
# wait(): re-read the status this often even without a message (lost message, pub/sub reconnect).
WAIT_POLL_S = 0.5

# BusyLoadingError (an AOF being replayed) is a ConnectionError; OSError covers socket and timeout errors.
_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.ReadOnlyError, rexc.OutOfMemoryError, OSError)
_URL_CREDENTIALS = re.compile(r"(\w+://)[^@/\s]*@")

P = ParamSpec("P")
T = TypeVar("T")


def _describe(exc: BaseException) -> str:
    text = _URL_CREDENTIALS.sub(r"\1", str(exc)) or type(exc).__name__
    return f"redis is not answering: {text}"


def _redis_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Redis outages become Unavailable (503 / UNAVAILABLE), the one error callers handle for them."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise Unavailable(_describe(exc)) from exc

    return wrapper


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _text(value: bytes | str | None) -> str | None:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def connect(url: str) -> aioredis.Redis:
    """The client every process uses. After Redis restarts, each pooled connection fails once on its next use;
    ``from_url`` (unlike ``Redis()``) sets no retry policy, so without one that failure reached callers: a gateway
    answered 503 with Redis back, a worker lost a finished result and spent a delivery (found by the fault drills).
    A retried command may run twice if the connection dropped after Redis ran it. The end-of-job scripts are
    idempotent (terminal states are final, results SET NX) and a doubled payload APPEND fails its CRC; a doubled
    submit would queue one job twice (run once, answered once, but one tenant slot held until the record expires)."""
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2)
    return aioredis.Redis.from_url(url, health_check_interval=30, retry=retry)


def new_job_id() -> str:
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class Delivery:
    job_id: str
    entry_id: str
    deliveries: int  # how many times this entry has been delivered, including this one
    meta: dict[str, Any]


@dataclass(frozen=True)
class QueueStats:
    length: int  # jobs queued or running (entries are deleted when their job ends)
    pending: int  # delivered to a worker and not yet acknowledged
    lag: int | None  # entries not yet delivered to the group (Redis >= 7; None when unknown)
    dead_letters: int
    consumers: int


# -- scripts -------------------------------------------------------------------------------------------
# Conventions: the stream is always KEYS[1] where present; ``ack`` removes the entry from the group's
# pending list and from the stream together, XACK first so no entry is ever deleted while pending.

_ACK = """
local function ack(stream, group, id)
  redis.pcall('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
end
local function release_slot(tenants, tenant)
  if tenant and tenant ~= '' then
    if redis.call('HINCRBY', tenants, tenant, -1) <= 0 then
      redis.call('HDEL', tenants, tenant)
    end
  end
end
"""

# KEYS: stream, record, payload, tenants. ARGV: max_pending, job_id, now, meta, record_ttl, tenant, tenant_max
# (0: no per-tenant cap). Returns the entry id, or 0 (queue full) / 1 (the tenant's quota full). The checks and the
# XADD are one atomic step, so concurrent submits cannot overshoot either cap.
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
           'deliveries', 0, 'meta', ARGV[4], 'tenant', ARGV[6])
local id = redis.call('XADD', KEYS[1], '*', 'job_id', ARGV[2], 'tenant', ARGV[6])
redis.call('HSET', KEYS[2], 'stream_id', id)
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('HINCRBY', KEYS[4], ARGV[6], 1)
return id
"""

# KEYS: stream, record, payload, tenants. ARGV: group, entry_id, consumer, deliveries, now, record_ttl, channel,
# expired_message, tenant (from the entry: the record may have expired). Returns the job's meta when it may run,
# nil when the entry was dropped.
_START = (
    _ACK
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

# KEYS: stream, record, payload, result, tenants. ARGV: group, entry_id, result_json, result_ttl, now, record_ttl,
# channel. The result is stored before the entry is acknowledged, in one step.
_COMPLETE = (
    _ACK
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  ack(KEYS[1], ARGV[1], ARGV[2])
  return 0
end
local status = redis.call('HGET', KEYS[2], 'status')
if status == 'succeeded' or status == 'failed' then
  ack(KEYS[1], ARGV[1], ARGV[2])
  return 0
end
if not redis.call('SET', KEYS[4], ARGV[3], 'NX', 'EX', ARGV[4]) then
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
# job_id, deliveries, dead_letter ('1' or '0'), dead_maxlen.
_FAIL = (
    _ACK
    + """
if redis.call('EXISTS', KEYS[2]) == 0 then
  ack(KEYS[1], ARGV[1], ARGV[2])
  return 0
end
local status = redis.call('HGET', KEYS[2], 'status')
if status == 'succeeded' or status == 'failed' then
  ack(KEYS[1], ARGV[1], ARGV[2])
  return 0
end
redis.call('HSET', KEYS[2], 'status', 'failed', 'updated_at', ARGV[5], 'error_code', ARGV[3],
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

# Whatever state the job is in, its entry goes too: a queued job is never delivered, a running one's worker
# finds the record gone.
# KEYS: stream, record, payload, result, outputs, tenants. ARGV: group, channel, required status ("" = any),
# tenant ("" = any: another tenant's job is gone as far as the caller can tell). 0 gone, 2 wrong status.
_DELETE = (
    _ACK
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

# KEYS: record. ARGV: code, message, now, record_ttl. Never creates a record that was deleted.
_NOTE_ERROR = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'last_error_code', ARGV[1], 'last_error_message', ARGV[2], 'updated_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: record. ARGV: field, value. Never creates a record that was deleted.
_SET_FIELD = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

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

# KEYS: stream. ARGV: group, consumer. XGROUP DELCONSUMER drops the consumer's pending entries with
# it, so only a consumer that owns none is removed.
_FORGET_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class JobQueue:
    """Gateway and worker sides of the queue; one instance per Redis client (decode_responses=False)."""

    def __init__(self, client: aioredis.Redis, settings: QueueSettings) -> None:
        self._client = client
        self.settings = settings
        p = settings.prefix
        self.stream = f"{p}:jobs"
        self.group = f"{p}:workers"
        self.dead = f"{p}:dead"
        self.tenants = f"{p}:tenants"
        self._prefix = p
        self._record_ttl = settings.result_ttl_s + settings.payload_ttl_s
        self._submit = client.register_script(_SUBMIT)
        self._start = client.register_script(_START)
        self._complete = client.register_script(_COMPLETE)
        self._fail = client.register_script(_FAIL)
        self._delete = client.register_script(_DELETE)
        self._set_field = client.register_script(_SET_FIELD)
        self._note_error = client.register_script(_NOTE_ERROR)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._release = client.register_script(_RELEASE)
        self._claim = client.register_script(_CLAIM)
        self._forget_consumer = client.register_script(_FORGET_CONSUMER)

    # -- key names ---------------------------------------------------------------------------------

    def record_key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    def payload_key(self, job_id: str) -> str:
        return f"{self._prefix}:payload:{job_id}"

    def result_key(self, job_id: str) -> str:
        return f"{self._prefix}:result:{job_id}"

    def outputs_key(self, job_id: str) -> str:
        return f"{self._prefix}:outputs:{job_id}"

    def channel(self, job_id: str) -> str:
        return f"{self._prefix}:done:{job_id}"

    @staticmethod
    def _check_id(job_id: str) -> None:
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
            raise JobNotFound("job not found (unknown, expired or deleted)")

    # -- gateway side ------------------------------------------------------------------------------

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """For readiness probes: False rather than an exception, and bounded even if Redis hangs."""
        try:
            async with asyncio.timeout(timeout_s):
                return bool(await self._client.ping())
        except (RedisError, OSError):  # TimeoutError is an OSError
            return False

    def tenant_quota(self, tenant: str) -> int | None:
        settings = self.settings
        return settings.tenant_quotas.get(tenant, settings.tenant_max_pending)

    @_redis_errors
    async def submit(self, files: Sequence[tuple[str, bytes]], meta: dict[str, Any], *, tenant: str) -> Job:
        """Store the upload and enqueue it for ``tenant``; QueueFull when ``max_pending`` jobs are queued or running,
        or the tenant's quota of them."""
        settings = self.settings
        quota = self.tenant_quota(tenant)
        retry, after = f"retry in {settings.retry_after_s} s", settings.retry_after_s
        full = QueueFull(f"the queue holds its maximum of {settings.max_pending} jobs; {retry}", after)
        over_quota = QueueFull(f"this tenant has its quota of {quota} jobs queued or running; {retry}", after)
        # Cheap early answers so a full queue does not cost an upload to Redis; the script decides.
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xlen(self.stream)
            pipe.hget(self.tenants, tenant)
            length, held = await pipe.execute()
        if length >= settings.max_pending:
            raise full
        if quota is not None and int(held or 0) >= quota:
            raise over_quota
        meta_json = json.dumps(meta, separators=(",", ":"))
        job_id = new_job_id()
        now = _now()
        # The payload exists before the entry does, so no worker can see the entry without it.
        await self._store_packed(self.payload_key(job_id), files, self.settings.payload_ttl_s)
        entry = await self._submit(
            keys=[self.stream, self.record_key(job_id), self.payload_key(job_id), self.tenants],
            args=[settings.max_pending, job_id, now, meta_json, self._record_ttl, tenant, quota or 0],
        )
        if entry == 0:
            raise full
        if entry == 1:
            raise over_quota
        created = datetime.fromisoformat(now)
        return Job(id=job_id, status="queued", created_at=created, updated_at=created, deliveries=0)

    async def _store_packed(self, key: str, files: Sequence[tuple[str, bytes]], ttl: int) -> None:
        """Write the packed upload in chunks: reserve the header, append the members, write the header.

        A 150 MB volume is never built a second time in memory, and the socket's send buffer never
        holds more than one chunk. Compression runs in a thread so the event loop keeps serving.
        """
        try:
            packer = payload_codec.StreamPacker(files)
        except ValueError as exc:  # a file name too long for the container
            raise InvalidRequest(str(exc)) from exc
        chunks = packer.chunks()
        pending: list[bytes] = []
        pending_bytes = 0
        await self._client.set(key, bytes(packer.header_size), ex=ttl)
        try:
            while True:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is not None:
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                if pending and (chunk is None or pending_bytes >= payload_codec.CHUNK_BYTES):
                    await self._client.append(key, b"".join(pending) if len(pending) > 1 else pending[0])
                    pending, pending_bytes = [], 0
                if chunk is None:
                    break
            await self._client.setrange(key, 0, packer.header())
        except BaseException:
            with contextlib.suppress(RedisError, OSError):
                await self._client.delete(key)
            raise

    @_redis_errors
    async def get(self, job_id: str, *, tenant: str | None = None) -> Job:
        """The job as it stands; JobNotFound for another ``tenant``'s job (None: any tenant, for workers)."""
        self._check_id(job_id)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.record_key(job_id))
            pipe.get(self.result_key(job_id))
            fields, result_json = await pipe.execute()
        if not fields:
            raise JobNotFound("job not found (unknown, expired or deleted)")
        record = {_text(k): _text(v) for k, v in fields.items()}
        if tenant is not None and record.get("tenant") != tenant:
            raise JobNotFound("job not found (unknown, expired or deleted)")
        status = record.get("status") or "queued"
        created = record.get("created_at") or _now()
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

    @_redis_errors
    async def delete(self, job_id: str, *, tenant: str | None = None) -> None:
        """Forget a job in any state; a worker still running it drops its result (complete() returns False)."""
        self._check_id(job_id)
        if await self._delete_when(job_id, "", tenant) == 0:
            raise JobNotFound("job not found (unknown, expired or deleted)")

    @_redis_errors
    async def delete_if_queued(self, job_id: str, *, tenant: str | None = None) -> bool:
        """Delete a job only while no worker has started it, atomically; False when it is gone or running.

        For callers that stopped waiting (a deadline, a hang-up): a job already running is left to
        finish, since reading the status and then deleting would race with a worker starting it.
        """
        self._check_id(job_id)
        return await self._delete_when(job_id, "queued", tenant) == 1

    @_redis_errors
    async def outputs(self, job_id: str, wanted: Callable[[str], bool], max_bytes: int) -> dict[str, bytes]:
        """The members of the job's kept outputs whose names ``wanted`` accepts, each read by its own range.

        A viewer scrolling a 300-slice volume asks for one slice's preview at a time: only that member's bytes
        leave Redis and get inflated, never the whole value. Empty when nothing was kept (expired, or the
        worker kept none); a value that fails to parse is reported, not trusted.
        """
        self._check_id(job_id)
        key = self.outputs_key(job_id)
        size = int(await self._client.strlen(key))
        if size == 0:
            return {}
        head_len = min(size, 64 * 1024)
        while True:
            head = await self._client.getrange(key, 0, head_len - 1)
            try:
                entries = payload_codec.read_index(head, size, max_bytes)
                break
            except payload_codec.HeaderIncomplete as more:
                if head_len >= size:
                    raise OutputNotAvailable("the kept outputs are truncated") from None
                head_len = min(size, more.needed)
            except ValueError as exc:
                raise OutputNotAvailable(f"the kept outputs cannot be read: {exc}") from exc
        chosen = [entry for entry in entries if wanted(entry.name)]
        async with self._client.pipeline(transaction=False) as pipe:
            for entry in chosen:
                pipe.getrange(key, entry.offset, entry.offset + entry.stored_len - 1)
            stored = await pipe.execute() if chosen else []
        try:
            return {e.name: payload_codec.extract(e, s) for e, s in zip(chosen, stored, strict=True)}
        except ValueError as exc:  # changed under us (deleted and rewritten) or corrupted
            raise OutputNotAvailable(f"the kept outputs cannot be read: {exc}") from exc

    async def _delete_when(self, job_id: str, status: str, tenant: str | None) -> int:
        return int(
            await self._delete(
                keys=[
                    self.stream,
                    self.record_key(job_id),
                    self.payload_key(job_id),
                    self.result_key(job_id),
                    self.outputs_key(job_id),
                    self.tenants,
                ],
                args=[self.group, self.channel(job_id), status, tenant or ""],
            )
        )

    async def wait(self, job_id: str, timeout_s: float, *, tenant: str | None = None) -> Job:
        """The job as soon as it ends, or as it stands after ``timeout_s``.

        Subscribes before reading the status, so a completion between the two cannot be missed, and
        re-reads every WAIT_POLL_S, so a lost message or a dropped pub/sub connection only delays.
        """
        self._check_id(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            subscribed = True
            try:
                await pubsub.subscribe(self.channel(job_id))
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

    @_redis_errors
    async def stats(self) -> QueueStats:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xlen(self.stream)
            pipe.xlen(self.dead)
            length, dead = await pipe.execute()
        pending = consumers = 0
        lag: int | None = None
        try:
            groups = await self._client.xinfo_groups(self.stream)
        except ResponseError:  # no stream yet
            groups = []
        for group in groups:
            info = {_text(k): v for k, v in group.items()}
            if _text(info.get("name")) == self.group:
                pending = int(info.get("pending") or 0)
                consumers = int(info.get("consumers") or 0)
                lag = int(info["lag"]) if info.get("lag") is not None else None
        return QueueStats(length=int(length), pending=pending, lag=lag, dead_letters=int(dead), consumers=consumers)

    # -- worker side -------------------------------------------------------------------------------

    @_redis_errors
    async def ensure_group(self) -> None:
        """Create the group from the stream's start (id 0), so jobs submitted before any worker count."""
        try:
            await self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _with_group(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call``; if Redis lost the group (a restart without persistence), create it and retry once."""
        try:
            return await call()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        await self.ensure_group()
        return await call()

    async def _begin(self, consumer: str, entry_id: str, job_id: str, deliveries: int, tenant: str) -> Delivery | None:
        """Mark the job running for ``consumer``; None (entry dropped) when its record or payload is gone."""
        meta = await self._start(
            keys=[self.stream, self.record_key(job_id), self.payload_key(job_id), self.tenants],
            args=[
                self.group,
                entry_id,
                consumer,
                deliveries,
                _now(),
                self._record_ttl,
                self.channel(job_id),
                f"the upload expired after waiting longer than {self.settings.payload_ttl_s} s in the queue; "
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
        return Delivery(job_id=job_id, entry_id=entry_id, deliveries=deliveries, meta=parsed)

    async def _drop_entry(self, entry_id: str) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()

    @_redis_errors
    async def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """New entries for ``consumer``; ``block_ms`` <= 0 returns at once (Redis reads BLOCK 0 as forever).

        The client's socket timeout must exceed ``block_ms``.
        """
        block = block_ms if block_ms > 0 else None
        response = await self._with_group(
            lambda: self._client.xreadgroup(self.group, consumer, {self.stream: ">"}, count=count, block=block)
        )
        entries: list[tuple[Any, Any]] = []
        streams = response.items() if isinstance(response, dict) else (response or [])
        for item in streams:
            _, stream_entries = item
            if isinstance(stream_entries, list) and stream_entries and isinstance(stream_entries[0], list):
                stream_entries = stream_entries[0]  # RESP3 maps a stream to [entries]
            entries.extend(stream_entries or [])
        deliveries: list[Delivery] = []
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            assert entry_id is not None
            fields = fields or {}
            job_id = _text(fields.get(b"job_id") or fields.get("job_id"))
            tenant = _text(fields.get(b"tenant") or fields.get("tenant")) or ""
            if not job_id or not JOB_ID_RE.fullmatch(job_id):
                await self._drop_entry(entry_id)  # not written by submit(): nothing to run
                continue
            delivery = await self._begin(consumer, entry_id, job_id, 1, tenant)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    @_redis_errors
    async def reclaim(self, consumer: str, count: int = 16) -> list[Delivery]:
        """The janitor: take over entries idle longer than the job deadline (their worker is presumed dead).

        A job past ``max_deliveries`` is failed with DeliveryLimit and dead-lettered instead of returned.
        """
        min_idle_ms = max(1, int(self.settings.job_deadline_s * 1000))
        claimed = await self._with_group(
            lambda: self._claim(keys=[self.stream], args=[self.group, consumer, min_idle_ms, count])
        )
        out: list[Delivery] = []
        for raw_id, raw_job, deliveries, raw_tenant in claimed or []:
            entry_id, job_id, deliveries = _text(raw_id), _text(raw_job), int(deliveries)
            tenant = _text(raw_tenant) or ""
            assert entry_id is not None and job_id is not None
            if not JOB_ID_RE.fullmatch(job_id):
                await self._drop_entry(entry_id)
                continue
            if deliveries > self.settings.max_deliveries:
                await self._dead_letter(entry_id, job_id, deliveries - 1)
                continue
            delivery = await self._begin(consumer, entry_id, job_id, deliveries, tenant)
            if delivery is not None:
                out.append(delivery)
        return out

    async def _dead_letter(self, entry_id: str, job_id: str, attempts: int) -> None:
        code, message = await self._client.hmget(self.record_key(job_id), ["last_error_code", "last_error_message"])
        if code or message:
            last = f"the last error was {_text(code) or 'internal'}: {_text(message) or ''}"
        else:
            last = "no error was recorded, so its worker most likely died or hung on it"
        error = DeliveryLimit(
            f"the job was delivered {attempts} times (the limit is {self.settings.max_deliveries}) "
            f"without finishing; {last}"
        )
        await self._finish_failed(Delivery(job_id, entry_id, attempts, {}), error, dead_letter=True)

    @_redis_errors
    async def payload(self, delivery: Delivery, max_bytes: int) -> list[tuple[str, bytes]]:
        """The job's files; JobNotFound if the upload expired or was deleted, PayloadTooLarge over ``max_bytes``."""
        blob = await self._client.get(self.payload_key(delivery.job_id))
        if blob is None:
            raise JobNotFound("the job's upload is gone (expired or deleted)")
        try:
            return await asyncio.to_thread(payload_codec.unpack, blob, max_bytes)
        except payload_codec.PayloadOverLimit as exc:
            raise PayloadTooLarge(str(exc)) from exc
        except ValueError as exc:
            raise ServiceError(f"the stored upload cannot be read: {exc}") from exc

    @_redis_errors
    async def heartbeat(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        """Reset the idle time of this consumer's in-flight entries so the janitor leaves them alone.

        JUSTID: the delivery counter is not bumped. Entries another consumer has taken over are skipped.
        """
        if deliveries:
            await self._heartbeat(keys=[self.stream], args=[self.group, consumer, *(d.entry_id for d in deliveries)])

    @_redis_errors
    async def release(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        """Graceful shutdown: hand unfinished entries back so the next janitor run takes them at once."""
        if not deliveries:
            return
        idle_ms = int(self.settings.job_deadline_s * 1000) * 2 + 1000
        await self._release(
            keys=[self.stream, *(self.record_key(d.job_id) for d in deliveries)],
            args=[self.group, consumer, idle_ms, _now(), self._record_ttl, *(d.entry_id for d in deliveries)],
        )

    @_redis_errors
    async def forget_consumer(self, consumer: str) -> bool:
        """XGROUP DELCONSUMER after release() on scale-down, unless it still owns entries (they would be lost)."""
        return bool(await self._forget_consumer(keys=[self.stream], args=[self.group, consumer]))

    @_redis_errors
    async def note_error(self, delivery: Delivery, error_code: str, message: str) -> None:
        """Remember a transient error so that a later DeliveryLimit can say what went wrong."""
        await self._note_error(
            keys=[self.record_key(delivery.job_id)], args=[error_code, message, _now(), self._record_ttl]
        )

    @_redis_errors
    @_redis_errors
    async def store_outputs(self, job_id: str, members: Sequence[tuple[str, bytes]]) -> None:
        """Keep what the derived formats need (service.outputs) for as long as the result; before ``complete``, so
        a caller who sees the job succeed finds them."""
        self._check_id(job_id)
        await self._store_packed(self.outputs_key(job_id), members, self.settings.result_ttl_s)

    @_redis_errors
    async def drop_outputs(self, job_id: str) -> None:
        """For a job deleted while it ran: what it kept must not outlive it (patient data). Not for a duplicate
        delivery that lost the race: the winner wrote the same key."""
        self._check_id(job_id)
        await self._client.delete(self.outputs_key(job_id))

    @_redis_errors
    async def note_forwarding(self, job_id: str, forwarding: Forwarding) -> bool:
        """Record how sending the job's DICOM SEG on is going; False when the job is gone (deleted, expired)."""
        self._check_id(job_id)
        done = await self._set_field(keys=[self.record_key(job_id)], args=["forwarding", forwarding.model_dump_json()])
        return bool(done)

    async def complete(self, delivery: Delivery, result_json: str) -> bool:
        """Store the result, mark the job succeeded, acknowledge, notify: one atomic step.

        False when nothing was stored: a duplicate delivery finished first (its result is kept), the job
        already failed, or it was deleted.
        """
        job_id = delivery.job_id
        stored = await self._complete(
            keys=[
                self.stream,
                self.record_key(job_id),
                self.payload_key(job_id),
                self.result_key(job_id),
                self.tenants,
            ],
            args=[
                self.group,
                delivery.entry_id,
                result_json,
                self.settings.result_ttl_s,
                _now(),
                self._record_ttl,
                self.channel(job_id),
            ],
        )
        return bool(stored)

    @_redis_errors
    async def fail(self, delivery: Delivery, error: ServiceError) -> None:
        """Final failure: input errors are not retried. Never overwrites a job that already ended."""
        await self._finish_failed(delivery, error, dead_letter=isinstance(error, DeliveryLimit))

    async def _finish_failed(self, delivery: Delivery, error: ServiceError, dead_letter: bool) -> None:
        job_id = delivery.job_id
        await self._fail(
            keys=[self.stream, self.record_key(job_id), self.payload_key(job_id), self.dead, self.tenants],
            args=[
                self.group,
                delivery.entry_id,
                error.code,
                error.message,
                _now(),
                self._record_ttl,
                self.channel(job_id),
                job_id,
                delivery.deliveries,
                "1" if dead_letter else "0",
                DEAD_LETTER_MAXLEN,
            ],
        )
