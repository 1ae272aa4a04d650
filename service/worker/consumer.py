"""The worker: jobs from the Redis stream through the pipeline, results back, nothing lost.

Up to ``concurrency`` jobs are in flight at once so their slices fill the batcher's batches; jobs are taken one
at a time, and only while those held have fewer than ``max_slices_in_flight`` slices in all, so a burst of large
volumes cannot take more memory than a few (a job larger than the bound runs alone). Input
errors (4xx) fail a job for good; anything else is treated as the worker's problem: the error is noted
and the entry handed back, so the janitor redelivers it (here or on another worker) until the delivery
limit sends it to the dead-letter stream. A heartbeat renews the leases of the jobs in flight while this
worker lives (a killed worker's lapse within ``queue.lease_s`` and another worker takes them); SIGTERM
stops intake, lets jobs in flight finish for ``drain_timeout_s`` and hands back the rest.

Every job runs under its timeout (``job_timeout_s`` plus a share per slice once the slices are known); past
it the job fails with job_timeout. An engine call that hangs fails its items (the batcher); with
``max_hung_engine_calls`` of them stuck this worker stops, hands its jobs back and exits non-zero
(``failed``), since only a new process gets its threads back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.config import Settings
from service.errors import JobNotFound, JobTimeout, ServiceError, Unavailable
from service.ops import tracing
from service.ops.metrics import Metrics
from service.outputs import formats as outputs
from service.outputs.dimse_send import dimse_forwarder
from service.outputs.forwarding import Forwarder
from service.queue import Delivery, JobQueue, presence
from service.schema import SegmentationResult
from service.worker.batcher import DynamicBatcher
from service.worker.engine import Engine
from service.worker.pipeline import Pipeline, Segmentation
from service.worker.served import LoadedModel, served_as

log = logging.getLogger(__name__)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Held(NamedTuple):
    """A job this worker is running: its delivery, its task, and when the worker took it (monotonic)."""

    delivery: Delivery
    task: asyncio.Task
    since: float

    @property
    def slices(self) -> int:
        return slices_of(self.delivery)


def slices_of(delivery: Delivery) -> int:
    """The job's slices as the gateway's probe declared them (its meta's shape); 1 when not said."""
    shape = delivery.meta.get("shape")
    try:
        return max(1, int(shape[0])) if isinstance(shape, list) and shape else 1
    except (TypeError, ValueError):
        return 1


@dataclass(frozen=True)
class Lane:
    """One loaded model and what serves it: its stream's queue, its batcher (batches never mix models), its pipeline."""

    model: LoadedModel
    queue: JobQueue
    batcher: DynamicBatcher
    pipeline: Pipeline


class Worker:
    """``models``: one engine (served as the default model) or the models ``served.load_models`` loaded."""

    def __init__(
        self,
        settings: Settings,
        models: Engine | Sequence[LoadedModel],
        client: aioredis.Redis,
        metrics: Metrics | None = None,
        consumer: str | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics or Metrics()
        self.consumer = consumer or consumer_name()
        self.queue = JobQueue(client, settings.queue)  # for what is keyed by job id: payloads, outputs, records
        self.executor = ThreadPoolExecutor(settings.worker.decode_threads, thread_name_prefix="c2p-decode")
        loaded = list(models) if isinstance(models, Sequence) else [served_as(models)]
        if not loaded:
            raise ValueError("a worker needs at least one model")
        self.lanes: dict[str, Lane] = {}
        for model in loaded:
            batcher = DynamicBatcher(
                self._batch_runner(model.engine),
                settings.engine.max_batch_size,
                settings.worker.max_queue_delay_ms,
                settings.worker.batch_timeout_s,
                on_hang=self._check_engines,
            )
            pipeline = Pipeline(model.engine, settings, self.executor, batcher, model.name, model.version)
            self.lanes[model.lane] = Lane(model, self.queue.for_lane(model.lane), batcher, pipeline)
        first = next(iter(self.lanes.values()))
        # The first model's parts, for the common case of one model (tests, ``c2p serve`` without a repository).
        self.engine, self.pipeline, self.batcher = first.model.engine, first.pipeline, first.batcher
        # The SEG goes back the way its study came (a job's meta ``deliver``: "dicomweb" or "dimse").
        self.forwarders: dict[str, Forwarder] = {}
        if settings.dicomweb.destination_url:
            self.forwarders["dicomweb"] = Forwarder.dicomweb(settings.dicomweb, self.queue, self.metrics)
        if settings.dimse.destination:
            self.forwarders["dimse"] = dimse_forwarder(settings.dimse, self.queue, self.metrics)
        self.in_flight: dict[str, Held] = {}
        self.stopping = asyncio.Event()  # no new jobs
        self.closed = asyncio.Event()  # jobs drained: background loops end
        self.ready = asyncio.Event()
        self.failed: str | None = None  # why this worker stopped itself (its process should exit non-zero)

    def _batch_runner(self, engine: Engine) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        def run_batch(images: np.ndarray) -> dict[str, np.ndarray]:
            start = time.perf_counter()
            outputs = engine.run(images)
            self.metrics.compute_duration.observe(time.perf_counter() - start)
            self.metrics.execution_count.inc()
            self.metrics.inference_count.inc(len(images))
            self.metrics.batch_size.observe(len(images))
            return outputs

        return run_batch

    def _lane(self, delivery: Delivery) -> JobQueue:
        return self.lanes[delivery.lane].queue

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler via the loop)."""
        self.stopping.set()

    def _announcement(self) -> dict[str, object]:
        return {
            "consumer": self.consumer,
            "models": [lane.model.announcement() for lane in self.lanes.values()],
            "device": self.engine.device,
            "warm": True,
        }

    async def run(self) -> None:
        for lane in self.lanes.values():
            await lane.queue.ensure_group()
        ttl = 3 * self.settings.worker.heartbeat_s
        prefix = self.settings.queue.prefix
        await presence.register(self.client, prefix, [lane.model.announcement() for lane in self.lanes.values()])
        await presence.announce(self.client, prefix, self.consumer, self._announcement(), ttl)
        self.ready.set()
        names = ", ".join(f"{lane.model.name}:{lane.model.version}" for lane in self.lanes.values())
        log.info("worker %s ready (models %s on %s)", self.consumer, names, self.engine.device)
        background = [
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._janitor(), name="janitor"),
        ]
        try:
            await self._intake()
        finally:
            await self._drain()
            self.stopping.set()
            self.closed.set()
            # The loops end on the stop event; cancel() only as a last resort (redis-py can swallow a
            # cancellation that lands mid-command, and a shutdown must not hang on it).
            _, stuck = await asyncio.wait(background, timeout=5)
            for task in stuck:
                task.cancel()
            with contextlib.suppress(RedisError):
                await presence.withdraw(self.client, self.settings.queue.prefix, self.consumer)
            for lane in self.lanes.values():
                await lane.batcher.close()
            for forwarder in self.forwarders.values():
                await forwarder.close(self.settings.worker.drain_timeout_s)
            self.executor.shutdown(wait=False, cancel_futures=True)
            log.info("worker %s stopped", self.consumer)

    async def _intake(self) -> None:
        backoff = 0.1
        while not self.stopping.is_set():
            if not self._has_room():
                await self._wait_for_slot()
                continue
            try:
                deliveries = await self.queue.read(self.consumer, 1, block_ms=500, lanes=list(self.lanes))
                backoff = 0.1
            except (RedisError, ServiceError, OSError) as err:
                log.warning("cannot read the job stream (%s); retrying in %.1f s", type(err).__name__, backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for delivery in deliveries:
                self._start(delivery)

    def _start(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._process(delivery), name=f"job-{delivery.job_id}")
        self.in_flight[delivery.job_id] = Held(delivery, task, time.monotonic())
        self.metrics.pending_requests.set(len(self.in_flight))
        task.add_done_callback(lambda _: self._finished(delivery.job_id))

    def _finished(self, job_id: str) -> None:
        self.in_flight.pop(job_id, None)
        self.metrics.pending_requests.set(len(self.in_flight))

    def _has_room(self) -> bool:
        """Room for one more job: fewer than ``concurrency`` held, and their slices under the bound (or none held)."""
        worker = self.settings.worker
        if len(self.in_flight) >= worker.concurrency:
            return False
        return sum(held.slices for held in self.in_flight.values()) < worker.max_slices_in_flight

    def _leased(self) -> list[Delivery]:
        """The jobs in flight whose leases the heartbeat renews: all but those held past ``job_deadline_s``, which
        lapse so another worker takes them (a live worker that is stuck on one must not keep it forever)."""
        oldest = time.monotonic() - self.settings.queue.job_deadline_s
        return [held.delivery for held in self.in_flight.values() if held.since > oldest]

    def _check_engines(self) -> None:
        """Too many engine calls stuck: stop taking jobs and let the process be replaced. Called by a batcher the
        moment a call hangs, before its jobs hand themselves back, so no janitor of this worker takes them again."""
        hung = sum(lane.batcher.hung for lane in self.lanes.values())
        if hung >= self.settings.worker.max_hung_engine_calls and self.failed is None:
            self.failed = f"{hung} engine call(s) hung past {self.settings.worker.batch_timeout_s:g} s"
            log.error("worker %s stops: %s; its jobs go back to the queue", self.consumer, self.failed)
            self.ready.clear()
            self.stop()

    async def _wait_for_slot(self) -> None:
        tasks = [held.task for held in self.in_flight.values()]
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _process(self, delivery: Delivery) -> None:
        try:
            await self._run_job(delivery)
        except (RedisError, OSError, Unavailable) as err:
            # Redis went away mid-job: nothing to report to; the entry stays pending and the janitor
            # (here or on another worker) redelivers it once Redis is back and the deadline passed.
            log.warning("job %s: redis unavailable while finishing (%s)", delivery.job_id, type(err).__name__)
            self.metrics.jobs.labels("interrupted").inc()

    async def _run_job(self, delivery: Delivery) -> None:
        attributes = {"c2p.job_id": delivery.job_id, "c2p.delivery": delivery.deliveries, "c2p.worker": self.consumer}
        with tracing.span("c2p.job", delivery.meta.get("trace"), **attributes):
            await self._run_traced_job(delivery)

    async def _run_traced_job(self, delivery: Delivery) -> None:
        queued_ms = _queued_ms(delivery)
        self.metrics.queue_duration.observe(queued_ms / 1000)
        try:
            files = await self.queue.payload(delivery, self.settings.limits.max_upload_bytes)
            segmentation = await self._segment(delivery, files, queued_ms)
            timings = segmentation.result.timings
            self.metrics.decode_duration.observe(timings.decode_ms / 1000)
            self.metrics.infer_duration.observe(timings.inference_ms / 1000)
            self.metrics.encode_duration.observe(timings.encode_ms / 1000)
            forwarder = self._forwarder_for(delivery.meta.get("deliver"))
            forward = forwarder is not None
            members: list[tuple[str, bytes]] = []
            if self.settings.worker.keep_outputs or forward:
                members = await asyncio.to_thread(outputs.kept_members, segmentation.volume, segmentation.result)
            if self.settings.worker.keep_outputs:
                kept = members  # a forwarded SEG is made from ``members``: the PACS's own patient and UIDs
                if self.settings.worker.deidentify:
                    kept = await asyncio.to_thread(outputs.deidentified, members, segmentation.volume)
                await self.queue.store_outputs(delivery.job_id, kept)
            stored = await self._lane(delivery).complete(delivery, segmentation.result.model_dump_json())
            self.metrics.jobs.labels("succeeded" if stored else "duplicate").inc()
            if not stored and self.settings.worker.keep_outputs:
                await self._drop_outputs_if_deleted(delivery.job_id)
            if stored and forwarder is not None:
                await self._forward(forwarder, delivery.job_id, segmentation.result, dict(members))
        except TimeoutError:
            timeout = JobTimeout(f"the job ran past its timeout and was stopped (delivery {delivery.deliveries})")
            await self._lane(delivery).fail(delivery, timeout)
            self.metrics.jobs.labels("timeout").inc()
            log.warning("job %s stopped at its timeout", delivery.job_id)
        except JobNotFound:
            # Deleted by its owner or expired while queued: there is nobody to answer.
            await self._lane(delivery).fail(delivery, JobNotFound("the job's upload expired before a worker took it"))
            self.metrics.jobs.labels("expired").inc()
        except Unavailable:
            raise
        except ServiceError as err:
            if err.http_status < 500:
                await self._lane(delivery).fail(delivery, err)
                self.metrics.jobs.labels("failed").inc()
                log.info("job %s failed: %s", delivery.job_id, err.code)
            else:
                await self._hand_back(delivery, err.code, err.message)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug or a crashing engine: retry elsewhere, dead-letter after the limit
            log.exception("job %s: unexpected error (delivery %d)", delivery.job_id, delivery.deliveries)
            await self._hand_back(delivery, "internal", f"{type(err).__name__}: {err}")

    async def _segment(self, delivery: Delivery, files: list[tuple[str, bytes]], queued_ms: float) -> Segmentation:
        """The pipeline under the job's timeout: the base at first, the slices' share added once they are known
        (the first progress report), never past the job deadline. TimeoutError when it passes."""
        worker = self.settings.worker
        began = asyncio.get_running_loop().time()
        cap = self.settings.queue.job_deadline_s
        async with asyncio.timeout(min(worker.job_timeout_s, cap)) as clock:

            def progress(done: int, total: int) -> None:
                clock.reschedule(began + min(worker.job_timeout_s + worker.job_timeout_per_slice_s * total, cap))

            pipeline = self.lanes[delivery.lane].pipeline
            return await pipeline.run(files, delivery.meta.get("modality_hint"), queued_ms=queued_ms, progress=progress)

    def _forwarder_for(self, deliver: object) -> Forwarder | None:
        """The sender a job asked for: its meta's ``deliver`` names the way its study came ("dicomweb", "dimse"; True
        from before DIMSE existed means DICOMweb); None when none is asked or configured."""
        channel = "dicomweb" if deliver is True else deliver
        return self.forwarders.get(channel) if isinstance(channel, str) else None

    async def _forward(
        self, forwarder: Forwarder, job_id: str, result: SegmentationResult, members: dict[str, bytes]
    ) -> None:
        """Make the DICOM SEG now, while the headers are in memory, and hand it to the background sender."""
        try:
            seg = await asyncio.to_thread(outputs.render, "dicom-seg", result, members, None, self.settings.seg)
        except ServiceError as err:
            await forwarder.failed(job_id, f"no DICOM SEG could be made: {err.message}")
            return
        forwarder.send(job_id, seg)

    async def _drop_outputs_if_deleted(self, job_id: str) -> None:
        """A job deleted while it ran must not leave its kept outputs behind; a duplicate that lost the race must
        not remove the winner's (the same key)."""
        try:
            await self.queue.get(job_id)
        except JobNotFound:
            await self.queue.drop_outputs(job_id)

    async def _hand_back(self, delivery: Delivery, code: str, message: str) -> None:
        try:
            await self._lane(delivery).note_error(delivery, code, message[:500])
            await self._lane(delivery).release(self.consumer, [delivery])
        except (RedisError, ServiceError, OSError):
            log.warning("job %s: cannot hand back; the janitor will reclaim it after the deadline", delivery.job_id)
        self.metrics.jobs.labels("released").inc()

    async def _heartbeat(self) -> None:
        ttl = 3 * self.settings.worker.heartbeat_s
        while not self.closed.is_set():  # beats on while draining: jobs in flight must not be reclaimed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), self.settings.worker.heartbeat_s)
            if self.closed.is_set():
                return
            try:
                await presence.announce(
                    self.client, self.settings.queue.prefix, self.consumer, self._announcement(), ttl
                )
                for lane, live in self._by_lane(self._leased()).items():
                    await lane.heartbeat(self.consumer, live)
            except (RedisError, ServiceError, OSError) as err:
                log.warning("heartbeat failed (%s)", type(err).__name__)

    async def _janitor(self) -> None:
        while not self.stopping.is_set():
            await self._sleep(self.settings.worker.janitor_interval_s)
            if self.stopping.is_set():
                return
            for lane in self.lanes.values():
                # One at a time, as intake takes them, while there is room; at most ``concurrency`` tries a round
                # (a try that dead-letters an entry past its delivery limit returns none).
                for _ in range(self.settings.worker.concurrency):
                    if self.stopping.is_set() or not self._has_room():
                        break
                    try:
                        reclaimed = await lane.queue.reclaim(self.consumer, count=1)
                    except (RedisError, ServiceError, OSError) as err:
                        log.warning("janitor failed on %s (%s)", lane.model.name, type(err).__name__)
                        break
                    if not reclaimed:
                        break
                    for delivery in reclaimed:
                        log.info("job %s reclaimed (delivery %d)", delivery.job_id, delivery.deliveries)
                        self.metrics.redeliveries.inc()
                        self._start(delivery)

    async def _drain(self) -> None:
        if not self.in_flight:
            return
        log.info("draining %d job(s) for up to %.0f s", len(self.in_flight), self.settings.worker.drain_timeout_s)
        tasks = [held.task for held in self.in_flight.values()]
        _, pending = await asyncio.wait(tasks, timeout=self.settings.worker.drain_timeout_s)
        if not pending:
            return
        unfinished = [held.delivery for held in self.in_flight.values() if held.task in pending]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        try:
            for lane, deliveries in self._by_lane(unfinished).items():
                await lane.release(self.consumer, deliveries)
            log.info("handed back %d unfinished job(s)", len(unfinished))
        except (RedisError, ServiceError, OSError):
            log.warning("could not hand back %d job(s); the janitor will reclaim them", len(unfinished))

    def _by_lane(self, deliveries: Sequence[Delivery]) -> dict[JobQueue, list[Delivery]]:
        grouped: dict[JobQueue, list[Delivery]] = {}
        for delivery in deliveries:
            grouped.setdefault(self._lane(delivery), []).append(delivery)
        return grouped


def _queued_ms(delivery: Delivery) -> float:
    submitted = delivery.meta.get("submitted_at")
    if not isinstance(submitted, str):
        return 0.0
    try:
        return max(0.0, (datetime.now(UTC) - datetime.fromisoformat(submitted)).total_seconds() * 1000)
    except ValueError:
        return 0.0
