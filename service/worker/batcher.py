"""Dynamic batching with Triton's rule, across jobs: slices from any request share a batch.

A batch is sent as soon as ``max_batch_size`` items are waiting; otherwise when the oldest waiting
item has waited ``max_queue_delay_ms``. The engine call is blocking, so it runs in a worker thread
and the event loop keeps accepting items meanwhile; one batch runs at a time (one device). The
batcher knows nothing of Redis or HTTP: items in, per-item outputs out.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

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
    def __init__(self, run_batch: RunBatch, max_batch_size: int, max_queue_delay_ms: float) -> None:
        if max_batch_size < 1 or max_queue_delay_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue_delay_ms >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay = max_queue_delay_ms / 1000
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

    async def _execute(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        self.stats.queue_seconds += sum(started - item.enqueued for item in batch)
        try:
            stacked = np.stack([item.array for item in batch])
            outputs = await asyncio.to_thread(self.run_batch, stacked)
        except Exception as err:  # the engine's error belongs to every item of this batch, not to the loop
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        finally:
            self.stats.compute_seconds += time.perf_counter() - started
        self.stats.inference_count += len(batch)
        self.stats.execution_count += 1
        for i, item in enumerate(batch):
            if not item.future.done():
                item.future.set_result({name: value[i] for name, value in outputs.items()})
