"""The c2p.v1.Segmentation service: the REST submit/get/delete path, over gRPC, on the same queue.

A call is checked the way the REST gateway checks an upload (limits, header probe in a thread, no
pixel decoded here) and its job is submitted with the same meta, so a worker cannot tell the APIs
apart. What gRPC adds is the call's deadline: a caller that waits for its result waits at most until
its deadline, and a job still queued when its caller gives up (deadline passed, call cancelled) is
deleted, so no worker spends time on a result nobody will read. A job a worker has already started is
left to finish; its result can be fetched with GetSegmentation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from service.access import Access
from service.auth import Principal
from service.config import GrpcSettings, Settings
from service.dataplane.jobs import series_uid
from service.dataplane.models import ModelDirectory
from service.dataplane.submit import idempotency_key, modality_hint, submit_upload
from service.errors import ImageTooLarge, InvalidRequest, JobNotFound, PayloadTooLarge, ServiceError, from_code
from service.grpc import segmentation_pb2, segmentation_pb2_grpc
from service.grpc.calls import (
    API,
    IDEMPOTENCY_METADATA,
    JOB_ID_KEY,
    abort,
    caller,
    check_response_size,
    service_errors,
    trace_headers,
)
from service.grpc.convert import job_to_proto
from service.inputs import Upload
from service.ops.metrics import Metrics
from service.queue import TERMINAL, JobQueue
from service.repository import parse_reference
from service.schema import Job

log = logging.getLogger(__name__)

# End a wait this long before the call's deadline, to delete a queued job and answer in time.
DEADLINE_MARGIN_S = 0.1


class SegmentationService(segmentation_pb2_grpc.SegmentationServicer):
    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        models: ModelDirectory,
        metrics: Metrics,
        config: GrpcSettings,
        access: Access,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.models = models
        self.metrics = metrics
        self.config = config
        self.access = access

    # -- RPCs ------------------------------------------------------------------------------------------

    async def Segment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async with service_errors(context, self.metrics):
            principal = await caller(context, self.access)
            files = [(f.name, f.data) for f in request.files]
            _check_files(files, self.settings)
            return await self._segment(principal, files, _options(request), context)

    async def SegmentStream(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async with service_errors(context, self.metrics):
            principal = await caller(context, self.access)  # before a byte of the upload is read
            files, options = await self._receive(request_iterator)
            return await self._segment(principal, files, options, context)

    async def GetSegmentation(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async with service_errors(context, self.metrics):
            principal = await caller(context, self.access)
            reply = self._reply(await self.queue.get(request.id, tenant=principal.tenant))
            await self.access.record("read", principal, API, request.id)
            return reply

    async def ListSegmentations(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async with service_errors(context, self.metrics):
            principal = await caller(context, self.access)
            jobs = await self.queue.jobs_for_series(principal.tenant, series_uid(request.series_uid))
            for job in jobs:
                await self.access.record("read", principal, API, job.id)
            reply = segmentation_pb2.ListSegmentationsResponse(jobs=[job_to_proto(job) for job in jobs])
            check_response_size(reply.ByteSize(), self.config.max_send_message_bytes)
            return reply

    async def WatchSegmentation(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # noqa: N802
        """Polls: status changes (queued -> running) are not published, only the end is."""
        async with service_errors(context, self.metrics):
            principal = await caller(context, self.access)
            last = None
            await self.access.record("read", principal, API, request.id, watch=1)
            while True:
                job = await self.queue.get(request.id, tenant=principal.tenant)
                if job.status != last:
                    yield self._reply(job)
                    last = job.status
                if job.status in TERMINAL:
                    return
                await asyncio.sleep(self.config.watch_interval_s)

    async def DeleteSegmentation(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async with service_errors(context, self.metrics):
            principal = await caller(context, self.access)
            await self.queue.delete(request.id, tenant=principal.tenant)
            await self.access.record("delete", principal, API, request.id)
            return segmentation_pb2.DeleteSegmentationResponse()

    # -- the submit path -------------------------------------------------------------------------------

    async def _segment(
        self,
        principal: Principal,
        files: list[Upload],
        options: Options,
        context: grpc.aio.ServicerContext,
    ) -> Any:
        started = time.perf_counter()
        wait_s, model = options.wait_s, options.model
        max_wait = self.settings.queue.max_wait_s
        if not 0 <= wait_s <= max_wait:
            raise InvalidRequest(f"wait_seconds must be between 0 and {max_wait:g}")
        hint = modality_hint(options.modality)
        name, version = parse_reference(model) if model is not None else (None, None)
        job = await submit_upload(
            self.queue,
            self.models,
            files,
            self.settings.limits,
            hint,
            tenant=principal.tenant,
            model=name,
            version=version,
            series_uid=None if options.series_uid is None else series_uid(options.series_uid),
            trace_parent=trace_headers(context),
            idempotency_key=idempotency_key(trace_headers(context).get(IDEMPOTENCY_METADATA)),
        )
        del files
        await self.access.record("submit", principal, API, job.id)
        if wait_s > 0:
            job = await self._wait(job, wait_s, context)
        if job.status == "failed" and job.error is not None:
            await abort(context, from_code(job.error.code, job.error.message), self.metrics, job.id)
        reply = self._reply(job)
        self.metrics.succeeded(API, started)
        return reply

    def _reply(self, job: Job) -> Any:
        message = job_to_proto(job)
        check_response_size(message.ByteSize(), self.config.max_send_message_bytes)
        return message

    async def _wait(self, job: Job, wait_s: float, context: grpc.aio.ServicerContext) -> Job:
        """The job when it ends, or after ``wait_s``, or just before the deadline (then DEADLINE_EXCEEDED)."""
        remaining = context.time_remaining()
        by_deadline = remaining is not None and remaining - DEADLINE_MARGIN_S <= wait_s
        budget = wait_s if remaining is None else min(wait_s, remaining - DEADLINE_MARGIN_S)
        try:
            if budget > 0:
                job = await self.queue.wait(job.id, budget)
            else:
                job = await self.queue.get(job.id)
        except asyncio.CancelledError:  # the caller cancelled, or the deadline passed first
            await asyncio.shield(self._drop_if_queued(job.id))
            raise
        if by_deadline and job.status not in TERMINAL:
            dropped = await self._drop_if_queued(job.id)
            self.metrics.request_failure.labels(API, "deadline_exceeded").inc()
            fate = "the job was deleted before it started" if dropped else "the job keeps running"
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the deadline passed before the result was ready; {fate}",
                trailing_metadata=((JOB_ID_KEY, job.id),),
            )
        return job

    async def _drop_if_queued(self, job_id: str) -> bool:
        """Delete a job nobody waits for any more, unless a worker has started it (its work is not wasted)."""
        try:
            if not await self.queue.delete_if_queued(job_id):
                return False
            log.info("job %s deleted: its caller stopped waiting before it started", job_id)
            return True
        except JobNotFound:
            return False
        except ServiceError as err:  # Redis is away: the job stays, and expires with its payload
            log.warning("could not delete abandoned job %s: %s", job_id, err.message)
            return False

    async def _receive(self, chunks: AsyncIterator[Any]) -> tuple[list[Upload], Options]:
        """The files of a chunked upload, with the limits enforced as chunks arrive, not after."""
        limits = self.settings.limits
        files: list[Upload] = []
        parts: list[bytes] = []
        name: str | None = None  # the file being received; None between files
        received = 0
        options = Options()
        first = True
        async for chunk in chunks:
            if first:
                options = _options(chunk)
                first = False
            if name is None:
                if len(files) >= limits.max_files:
                    raise ImageTooLarge(
                        f"more than {limits.max_files} files in one request; the limit is {limits.max_files}"
                    )
                name = chunk.name
            elif chunk.name and chunk.name != name:
                raise InvalidRequest(
                    f"a chunk of {chunk.name!r} arrived before {name!r} ended; set last on each file's final chunk"
                )
            received += len(chunk.data)
            if received > limits.max_upload_bytes:
                raise PayloadTooLarge(f"upload exceeds the limit of {limits.max_upload_bytes} bytes")
            parts.append(chunk.data)
            if chunk.last:
                files.append((name, parts[0] if len(parts) == 1 else b"".join(parts)))
                parts, name = [], None
        if name is not None:
            raise InvalidRequest(f"the upload ended inside {name!r}: a file's final chunk must have last set")
        if not files:
            raise InvalidRequest("no file in the upload")
        return files, options


@dataclass(frozen=True)
class Options:
    """What a Segment request (or a stream's first chunk) asks beside its files."""

    modality: str | None = None
    model: str | None = None
    series_uid: str | None = None
    wait_s: float = 0.0


def _options(message: Any) -> Options:
    def field(name: str) -> str | None:
        return getattr(message, name) if message.HasField(name) else None

    return Options(field("modality"), field("model"), field("series_uid"), message.wait_seconds)


def _check_files(files: Sequence[Upload], settings: Settings) -> None:
    limits = settings.limits
    if not files:
        raise InvalidRequest("no file in the request")
    if len(files) > limits.max_files:
        raise ImageTooLarge(f"{len(files)} files in one request; the limit is {limits.max_files}")
    total = sum(len(data) for _, data in files)
    if total > limits.max_upload_bytes:
        raise PayloadTooLarge(f"upload of {total} bytes exceeds the limit of {limits.max_upload_bytes} bytes")
