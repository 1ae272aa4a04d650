"""The queue's layout in Redis: which key holds what, for how long, and which job ids may name one.

Why one module: the Lua scripts, the gateway's reads and the worker's writes must agree on every name and
lifetime, and a job id reaches a key name only after it is checked here. Keys under ``settings.prefix`` (``p``)::

    {p}:jobs:{lane}   one stream of {job_id} per model artifact, the lane being the first 12 hex digits of its
                      digest; consumer group {p}:workers on each; an entry lives until its job ends
    {p}:dead          dead-letter stream (approximate MAXLEN 10000)
    {p}:job:{id}      record hash: status, created_at, updated_at, deliveries, meta, stream_id, ...
    {p}:payload:{id}  the packed upload (service.queue.payload), TTL payload_ttl_s, deleted when the job ends
    {p}:result:{id}   the result JSON, TTL result_ttl_s
    {p}:outputs:{id}  what the derived formats need beyond the result (service.outputs.formats), packed like a payload,
                      TTL result_ttl_s, written before the job completes; read by ranges, one member at a time
    {p}:done:{id}     pub/sub channel told when the job ends (or is deleted)
    {p}:tenants       hash: tenant -> its jobs queued or running (what the per-tenant quota bounds)
    {p}:series:{h}    set of one tenant's job ids for one DICOM series, h the sha256 of tenant and
                      SeriesInstanceUID (no UID in a key name); TTL record_ttl, refreshed by each job

A record lives as long as its upload may wait plus as long as its result is kept (``record_ttl``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime

from service.config import QueueSettings
from service.errors import JobNotFound

# secrets.token_urlsafe(16): 22 characters of the URL-safe base64 alphabet. Anything else is refused
# before it reaches a key name.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")
DEAD_LETTER_MAXLEN = 10_000
# A lane is the first 12 hex digits of a model artifact's sha256: two artifacts never share a stream, and a worker
# reads only the streams of the models it has loaded.
LANE_DIGITS = 12
LANE_RE = re.compile(r"^[0-9a-f]{12}$")


def lane_of(digest: str) -> str:
    lane = str(digest)[:LANE_DIGITS]
    if not LANE_RE.fullmatch(lane):
        raise ValueError(f"an artifact digest starts with {LANE_DIGITS} lowercase hex digits, got {digest!r}")
    return lane


def new_job_id() -> str:
    return secrets.token_urlsafe(16)


def check_id(job_id: str) -> None:
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise JobNotFound("job not found (unknown, expired or deleted)")


def now() -> str:
    """The timestamp written into records (created_at, updated_at)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


class QueueKeys:
    """The names under ``settings.prefix`` and the record's lifetime; ``lane`` binds the keys to one model's stream.

    Records, payloads and results are keyed by job id alone; only the stream and its group belong to a lane, so a
    queue object not bound to one can do everything except touch a stream."""

    def __init__(self, settings: QueueSettings, lane: str | None = None) -> None:
        p = settings.prefix
        if lane is not None:
            lane_of(lane)
        self.lane = lane
        self.group = f"{p}:workers"
        self.dead = f"{p}:dead"
        self.tenants = f"{p}:tenants"
        self._prefix = p
        self.record_ttl = settings.result_ttl_s + settings.payload_ttl_s

    def stream_of(self, lane: str) -> str:
        return f"{self._prefix}:jobs:{lane_of(lane)}"

    @property
    def stream(self) -> str:
        if self.lane is None:
            raise RuntimeError("this queue is not bound to a model's lane: use JobQueue.for_lane(lane)")
        return self.stream_of(self.lane)

    def record_key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    def payload_key(self, job_id: str) -> str:
        return f"{self._prefix}:payload:{job_id}"

    def result_key(self, job_id: str) -> str:
        return f"{self._prefix}:result:{job_id}"

    def outputs_key(self, job_id: str) -> str:
        return f"{self._prefix}:outputs:{job_id}"

    def series_key(self, tenant: str, series_uid: str) -> str:
        digest = hashlib.sha256(f"{tenant}\0{series_uid}".encode()).hexdigest()[:32]
        return f"{self._prefix}:series:{digest}"

    def idempotency_key(self, tenant: str, key: str) -> str:
        """Where a submit's idempotency key (the caller's, or the upload's digest) names the job it made."""
        digest = hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()[:32]
        return f"{self._prefix}:idem:{digest}"

    def channel(self, job_id: str) -> str:
        return f"{self._prefix}:done:{job_id}"
