"""A job's outcome as every API reads it, and the wait of protocols that cannot collect a job later.

The Open Inference Protocol (REST and gRPC) has no call that fetches a result afterwards: its request waits for the
job, and a job still queued or running when the wait ends (time, the caller hanging up, a cancelled call, a server
shutdown) is deleted whatever its state, so that no worker runs on for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable
from typing import Any

from redis.exceptions import RedisError

from service.errors import Cancelled, DeadlineExceeded, InvalidRequest, JobNotFound, ServiceError, from_code
from service.queue import TERMINAL, JobQueue
from service.schema import Job

log = logging.getLogger(__name__)


def failure(job: Job) -> ServiceError | None:
    """The error a failed job answers with (the shared table's, by its stored code); None otherwise."""
    if job.status == "failed" and job.error is not None:
        return from_code(job.error.code, job.error.message)
    return None


async def wait_or_delete(queue: JobQueue, job_id: str, wait_s: float, stop: Awaitable[Any] | None = None) -> Job:
    """The finished job within ``wait_s`` (0 or less: as it is now); DeadlineExceeded past it, Cancelled when
    ``stop`` (e.g. the client hanging up) completes first; either way the job is deleted."""
    waiter = asyncio.ensure_future(queue.wait(job_id, wait_s) if wait_s > 0 else queue.get(job_id))
    helpers = [waiter] if stop is None else [waiter, asyncio.ensure_future(stop)]
    job: Job | None = None
    try:
        done, _ = await asyncio.wait(helpers, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            raise Cancelled("the client closed the request; its job was deleted")
        job = waiter.result()
    finally:
        await asyncio.shield(_finish(queue, job_id, job, helpers))
    if job.status not in TERMINAL:
        raise DeadlineExceeded(f"no result within {max(wait_s, 0):g} s; the job was deleted")
    return job


async def _finish(queue: JobQueue, job_id: str, job: Job | None, tasks: list[asyncio.Future[Any]]) -> None:
    """Shielded: a cancelled request still stops its helpers and drops its unfinished job."""
    for task in tasks:
        await stop_task(task)
    if job is not None and job.status in TERMINAL:
        return
    try:
        await queue.delete(job_id)
        log.info("job %s deleted: its caller stopped waiting", job_id)
    except JobNotFound:
        pass  # finished and expired, or deleted already
    except (ServiceError, RedisError, OSError) as err:  # Redis away: the job expires with its payload
        log.warning("could not delete abandoned job %s: %s", job_id, err)


async def stop_task(task: asyncio.Future[Any]) -> None:
    """Cancel until it is done: redis-py (8.1) swallows a cancellation that lands inside a command now and then, and
    a single cancel() would then leave the wait running to its end."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()  # retrieved: an error after the decision to stop is of no interest


UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def series_uid(value: str) -> str:
    """A caller's SeriesInstanceUID, refused unless it is a DICOM UID (digits and dots, at most 64 characters)."""
    if not isinstance(value, str) or len(value) > 64 or not UID_RE.fullmatch(value):
        raise InvalidRequest("series_uid must be a DICOM UID: digits and dots, at most 64 characters")
    return value
