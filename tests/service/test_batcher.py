from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.worker.batcher import DynamicBatcher


class FakeEngine:
    """Records batch sizes; output = input * 2 so routing mistakes show."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.sizes: list[int] = []
        self.delay, self.fail_on = delay, fail_on
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            self.sizes.append(len(batch))
        time.sleep(self.delay)
        if self.fail_on is not None and (batch == self.fail_on).any():
            raise RuntimeError("engine failed")
        return {"double": batch * 2, "sum": batch.reshape(len(batch), -1).sum(1)}


def run(coro):
    return asyncio.run(coro)


def test_full_batches_go_at_once_and_results_reach_their_callers() -> None:
    engine = FakeEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=4, max_queue_delay_ms=10_000)
        start = time.perf_counter()
        results = await asyncio.gather(*(batcher.submit(np.full((2,), i, np.float32)) for i in range(8)))
        elapsed = time.perf_counter() - start
        await batcher.close()
        return results, elapsed, batcher.stats

    results, elapsed, stats = run(main())
    assert elapsed < 1.0  # never waited for the 10 s delay: the batches were full
    assert engine.sizes == [4, 4]
    for i, out in enumerate(results):
        assert out["double"].tolist() == [2 * i, 2 * i] and out["sum"] == 2 * i
    assert (stats.inference_count, stats.execution_count) == (8, 2)


def test_a_lone_item_waits_at_most_the_delay() -> None:
    engine = FakeEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=8, max_queue_delay_ms=50)
        start = time.perf_counter()
        await batcher.submit(np.zeros(1, np.float32))
        elapsed = time.perf_counter() - start
        await batcher.close()
        return elapsed

    elapsed = run(main())
    assert 0.04 <= elapsed < 0.5
    assert engine.sizes == [1]


def test_items_arriving_during_a_batch_form_the_next_one() -> None:
    engine = FakeEngine(delay=0.1)

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=16, max_queue_delay_ms=0)
        first = asyncio.ensure_future(batcher.submit(np.zeros(1, np.float32)))
        await asyncio.sleep(0.03)  # the first batch (of 1) is running now
        rest = [asyncio.ensure_future(batcher.submit(np.ones(1, np.float32))) for _ in range(5)]
        await asyncio.gather(first, *rest)
        await batcher.close()

    run(main())
    assert engine.sizes == [1, 5]


def test_an_item_that_breaks_its_batch_fails_alone() -> None:
    engine = FakeEngine(fail_on=7)

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=3, max_queue_delay_ms=1000)
        first = await asyncio.gather(*(batcher.submit(np.array([v])) for v in (1.0, 7.0, 3.0)), return_exceptions=True)
        good = await asyncio.gather(batcher.submit(np.array([2.0])), batcher.submit(np.array([3.0])))
        await batcher.close()
        return first, good

    first, good = run(main())
    assert isinstance(first[1], RuntimeError)  # the poisonous item
    assert [first[0]["double"].tolist(), first[2]["double"].tolist()] == [[2.0], [6.0]]  # its batch mates did not
    assert engine.sizes == [3, 1, 1, 1, 2]  # the batch, then each item alone, then the next batch
    assert [g["double"].tolist() for g in good] == [[4.0], [6.0]]


def test_a_hung_engine_call_fails_its_items_and_the_next_batch_runs_on_a_fresh_thread() -> None:
    release = threading.Event()
    threads: list[int] = []

    def engine(batch: np.ndarray) -> dict[str, np.ndarray]:
        threads.append(threading.get_ident())
        if (batch == 9).any():
            release.wait(10)  # a native call that does not come back (until the test lets it)
        return {"double": batch * 2}

    async def main():
        from service.errors import EngineHung

        batcher = DynamicBatcher(engine, max_batch_size=1, max_queue_delay_ms=0, batch_timeout_s=0.2)
        with pytest.raises(EngineHung, match="batch_timeout_s"):
            await batcher.submit(np.array([9.0]))
        assert batcher.hung == 1
        after = await batcher.submit(np.array([4.0]))  # served while the hung call is still stuck
        release.set()
        for _ in range(100):
            if batcher.hung == 0:
                break
            await asyncio.sleep(0.01)
        await batcher.close()
        return after, batcher.hung

    after, hung = run(main())
    assert after["double"].tolist() == [8.0] and hung == 0  # the stuck call came back at last: no longer counted
    assert threads[0] != threads[1]


def test_cancelled_items_are_not_computed() -> None:
    engine = FakeEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=4, max_queue_delay_ms=100)
        doomed = asyncio.ensure_future(batcher.submit(np.array([1.0])))
        kept = asyncio.ensure_future(batcher.submit(np.array([2.0])))
        await asyncio.sleep(0.01)
        doomed.cancel()
        out = await kept
        await batcher.close()
        return out

    assert run(main())["double"].tolist() == [4.0]
    assert engine.sizes == [1]


def test_close_drains_waiting_items_and_refuses_new_ones() -> None:
    engine = FakeEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=8, max_queue_delay_ms=10_000)
        waiting = [asyncio.ensure_future(batcher.submit(np.array([float(i)]))) for i in range(3)]
        await asyncio.sleep(0.01)
        await batcher.close()  # must not wait the 10 s delay
        with pytest.raises(RuntimeError, match="shutting down"):
            await batcher.submit(np.array([0.0]))
        return await asyncio.gather(*waiting)

    start = time.perf_counter()
    results = run(main())
    assert time.perf_counter() - start < 1.0
    assert [r["double"].tolist() for r in results] == [[0.0], [2.0], [4.0]]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(FakeEngine(), max_batch_size=0, max_queue_delay_ms=1)
