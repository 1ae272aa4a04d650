"""Dynamic batching with Triton's rule, across jobs: slices from any request share a batch.

A batch is sent as soon as ``max_batch_size`` items are waiting; otherwise when the oldest waiting
item has waited ``max_queue_delay_ms``. The engine call is blocking, so it runs in a thread of the
batcher's own and the event loop keeps accepting items meanwhile; one batch runs at a time (one
device). The batcher knows nothing of Redis or HTTP: items in, per-item outputs out.

Two failures stay with the items they belong to. A batch the engine fails is run again one item at a
time, so only an item that fails alone fails (one poisonous slice must not fail every job it shared a
batch with). A batch still running after ``batch_timeout_s`` is hung: its items fail with EngineHung,
its thread is left to finish or not (Python cannot stop a thread inside native code) and the next
batch runs on a fresh thread; ``hung`` counts the calls still stuck, for the worker to judge its health.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.errors import EngineHung

log = logging.getLogger(__name__)

RunBatch = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass
class _Item:
    array: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    """Triton's pair: inferences (items) vs executions (batches); their ratio is the mean batch size."""

    inference_count: int = 0
    execution_count: int = 0
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0


class DynamicBatcher:
    def __init__(
        self,
        run_batch: RunBatch,
        max_batch_size: int,
        max_queue_delay_ms: float,
        batch_timeout_s: float | None = None,
        on_hang: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_delay_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue_delay_ms >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1000
        self.batch_timeout_s = batch_timeout_s
        self.on_hang = on_hang  # told at once, before the items fail: the owner judges its health first
        self.hung = 0  # engine calls past the timeout that have not returned yet
        self._executor = self._new_executor()
        self.stats = BatcherStats()
        self._pending: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="dynamic-batcher")

    async def submit(self, array: np.ndarray) -> dict[str, np.ndarray]:
        """One item (e.g. one slice [3, S, S]) -> its outputs, each without the batch axis."""
        if self._closing:
            raise RuntimeError("the batcher is shutting down")
        self.start()
        item = _Item(array, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self._wakeup.set()
        return await item.future

    async def close(self) -> None:
        """Stop taking items; finish what is waiting (drain), then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=False)

    @staticmethod
    def _new_executor() -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, thread_name_prefix="c2p-engine")

    def _take(self) -> list[_Item]:
        batch = []
        while self._pending and len(batch) < self.max_batch_size:
            item = self._pending.popleft()
            if not item.future.cancelled():  # a caller that gave up needs no compute
                batch.append(item)
        return batch

    async def _loop(self) -> None:
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._pending[0].enqueued + self.max_delay
            while len(self._pending) < self.max_batch_size and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._execute(batch)

    async def _call(self, stacked: np.ndarray) -> dict[str, np.ndarray]:
        """One engine call on the batcher's thread, given up after ``batch_timeout_s`` (the thread is then left
        behind and replaced)."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, stacked)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.batch_timeout_s)
        except TimeoutError:
            self.hung += 1
            future.add_done_callback(self._unhung)
            stuck, self._executor = self._executor, self._new_executor()
            stuck.shutdown(wait=False)
            log.error("an engine call of %d item(s) passed %g s; its thread is abandoned (%d stuck)",
                      len(stacked), self.batch_timeout_s, self.hung)  # fmt: skip
            if self.on_hang is not None:
                self.on_hang()
            raise EngineHung(
                f"the engine did not answer a batch within {self.batch_timeout_s:g} s (batch_timeout_s)"
            ) from None

    def _unhung(self, future: asyncio.Future) -> None:
        self.hung -= 1
        if not future.cancelled():
            future.exception()  # retrieved: a late error of an abandoned call is not "never retrieved"

    async def _execute(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        self.stats.queue_seconds += sum(started - item.enqueued for item in batch)
        try:
            await self._run(batch)
        finally:
            self.stats.compute_seconds += time.perf_counter() - started

    async def _run(self, batch: list[_Item]) -> None:
        try:
            outputs = await self._call(np.stack([item.array for item in batch]))
        except EngineHung as err:  # every item waited on the call: all of them failed, none is retried here
            _fail(batch, err)
            return
        except Exception as err:
            if len(batch) == 1:
                _fail(batch, err)
                return
            # Which item broke it? Each alone: only an item that fails by itself fails.
            for item in batch:
                if not item.future.done():
                    await self._run([item])
            return
        self.stats.inference_count += len(batch)
        self.stats.execution_count += 1
        for i, item in enumerate(batch):
            if not item.future.done():
                item.future.set_result({name: value[i] for name, value in outputs.items()})


def _fail(batch: list[_Item], err: Exception) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(err)
