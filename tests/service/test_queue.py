"""JobQueue against a real Redis: the lifecycle, back-pressure, deletion, redelivery and dead letters."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from service.config import QueueSettings
from service.errors import (
    DeliveryLimit,
    InvalidImage,
    InvalidRequest,
    JobNotFound,
    PayloadTooLarge,
    QueueFull,
    Unavailable,
)
from service.queue import Delivery, JobQueue, new_job_id
from service.queue.redis_server import PrivateRedis
from service.schema import (
    InputInfo,
    Mask,
    ModelInfo,
    Preprocessing,
    Reliability,
    SegmentationResult,
    SliceMask,
    Timings,
)

pytestmark = pytest.mark.anyio

FILES = [("a.png", b"\x89PNG fake" * 100), ("b.dcm", bytes(4096))]
META = {"format": "png", "modality": "US", "shape": [1, 2, 2]}


def result_json(model_name: str) -> str:
    return SegmentationResult(
        model=ModelInfo(name=model_name, version="v1", digest="0" * 64, engine="onnx"),
        input=InputInfo(format="png", shape=(1, 2, 2), preprocessing=Preprocessing(method="rgb", input_size=64)),
        mask=Mask(size=(2, 2), slices=[SliceMask(index=0, counts="4", area=0)]),
        reliability=Reliability(score=0.9, level="high", suppressed=False, slices=[]),
        timings=Timings(),
    ).model_dump_json()


# The lane of a model artifact (service.queue.keys): every stream belongs to one.
LANE = "0123456789ab"


def make_queue(client: aioredis.Redis, settings: QueueSettings, **changes: Any) -> JobQueue:
    return JobQueue(client, settings.model_copy(update=changes), lane=LANE)


async def submit_and_read(queue: JobQueue, consumer: str = "w1") -> Delivery:
    await queue.ensure_group()
    job = await queue.submit(FILES, META, tenant="t1")
    (delivery,) = await queue.read(consumer, count=10, block_ms=0)
    assert delivery.job_id == job.id
    return delivery


async def test_submit_read_complete_get(redis_client: aioredis.Redis, queue_settings: QueueSettings) -> None:
    queue = make_queue(redis_client, queue_settings)
    await queue.ensure_group()
    await queue.ensure_group()  # BUSYGROUP is tolerated
    job = await queue.submit(FILES, META, tenant="t1")
    assert job.status == "queued" and job.deliveries == 0 and len(job.id) == 22
    assert (await queue.get(job.id)).status == "queued"
    assert await redis_client.ttl(queue.payload_key(job.id)) > queue_settings.payload_ttl_s - 5
    assert await redis_client.ttl(queue.record_key(job.id)) > queue_settings.payload_ttl_s

    (delivery,) = await queue.read("w1", count=4, block_ms=50)
    assert delivery == Delivery(job.id, delivery.entry_id, 1, META, LANE, "t1")
    running = await queue.get(job.id)
    assert running.status == "running" and running.deliveries == 1
    record = await redis_client.hgetall(queue.record_key(job.id))
    assert record[b"consumer"] == b"w1" and record[b"stream_id"].decode() == delivery.entry_id
    assert await queue.payload(delivery, max_bytes=1 << 20) == FILES
    with pytest.raises(PayloadTooLarge):
        await queue.payload(delivery, max_bytes=100)

    assert await queue.complete(delivery, result_json("first")) is True
    done = await queue.get(job.id)
    assert done.status == "succeeded" and done.error is None
    assert done.result is not None and done.result.model.name == "first"
    assert done.updated_at >= done.created_at
    assert not await redis_client.exists(queue.payload_key(job.id))  # freed once the result is stored
    stats = await queue.stats()
    assert (stats.length, stats.pending, stats.dead_letters, stats.consumers) == (0, 0, 0, 1)
    assert stats.lag in (0, None)  # None before Redis 7
    assert await queue.read("w1", count=4, block_ms=0) == []


async def test_wait_wakes_on_completion(redis_client: aioredis.Redis, queue_settings: QueueSettings) -> None:
    queue = make_queue(redis_client, queue_settings)
    delivery = await submit_and_read(queue)
    waiter = asyncio.create_task(queue.wait(delivery.job_id, timeout_s=10))
    await asyncio.sleep(0.2)  # the waiter is subscribed and waiting
    assert not waiter.done()
    completed_at = time.perf_counter()
    assert await queue.complete(delivery, result_json("m"))
    job = await waiter
    assert time.perf_counter() - completed_at < 0.1  # the message, not the 0.5 s re-read
    assert job.status == "succeeded" and job.result is not None
    # an ended job is answered at once
    started = time.perf_counter()
    assert (await queue.wait(delivery.job_id, timeout_s=5)).status == "succeeded"
    assert time.perf_counter() - started < 0.1


async def test_wait_times_out_with_the_current_job(redis_client: aioredis.Redis, queue_settings: QueueSettings) -> None:
    queue = make_queue(redis_client, queue_settings)
    job = await queue.submit(FILES, META, tenant="t1")
    started = time.perf_counter()
    still = await queue.wait(job.id, timeout_s=0.3)
    assert 0.3 <= time.perf_counter() - started < 0.6
    assert still.status == "queued" and still.id == job.id
    assert (await queue.wait(job.id, timeout_s=0)).status == "queued"
    with pytest.raises(JobNotFound):
        await queue.wait(new_job_id(), timeout_s=1)


async def test_wait_sees_a_failure_and_a_deletion(redis_client: aioredis.Redis, queue_settings: QueueSettings) -> None:
    queue = make_queue(redis_client, queue_settings)
    delivery = await submit_and_read(queue)
    waiter = asyncio.create_task(queue.wait(delivery.job_id, timeout_s=10))
    await asyncio.sleep(0.05)
    await queue.fail(delivery, InvalidImage("no pixel data"))
    failed = await asyncio.wait_for(waiter, 1)
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "invalid_image"

    other = await queue.submit(FILES, META, tenant="t1")
    waiter = asyncio.create_task(queue.wait(other.id, timeout_s=10))
    await asyncio.sleep(0.05)
    await queue.delete(other.id)
    with pytest.raises(JobNotFound):
        await asyncio.wait_for(waiter, 1)


async def test_queue_full(redis_client: aioredis.Redis, queue_settings: QueueSettings) -> None:
    queue = make_queue(redis_client, queue_settings, max_pending=2, retry_after_s=7)
    await queue.ensure_group()
    await queue.submit(FILES, META, tenant="t1")
    await queue.submit(FILES, META, tenant="t1")
    with pytest.raises(QueueFull) as caught:
        await queue.submit(FILES, META, tenant="t1")
    assert caught.value.retry_after_s == 7 and caught.value.http_status == 429
    (delivery, _) = await queue.read("w1", count=2, block_ms=0)
    with pytest.raises(QueueFull):  # running jobs count too
        await queue.submit(FILES, META, tenant="t1")
    await queue.complete(delivery, result_json("m"))
    await queue.submit(FILES, META, tenant="t1")


async def test_concurrent_submits_never_exceed_the_cap(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    queue = make_queue(redis_client, queue_settings, max_pending=20)
    outcomes = await asyncio.gather(
        *(queue.submit(FILES, META, tenant="t1") for _ in range(50)), return_exceptions=True
    )
    accepted = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(accepted) == 20 and all(isinstance(o, QueueFull) for o in refused)
    assert await redis_client.xlen(queue.stream) == 20
    payloads = [k async for k in redis_client.scan_iter(match=f"{queue_settings.prefix}:payload:*")]
    records = [k async for k in redis_client.scan_iter(match=f"{queue_settings.prefix}:job:*")]
    assert len(payloads) == len(records) == 20  # a refused submit leaves nothing behind


async def test_delete_while_queued(redis_client: aioredis.Redis, queue_settings: QueueSettings) -> None:
    queue = make_queue(redis_client, queue_settings)
    await queue.ensure_group()
    job = await queue.submit(FILES, META, tenant="t1")
    kept = await queue.submit(FILES, META, tenant="t1")
    await queue.delete(job.id)
    with pytest.raises(JobNotFound):
        await queue.get(job.id)
    with pytest.raises(JobNotFound):
        await queue.delete(job.id)
    assert [d.job_id for d in await queue.read("w1", count=10, block_ms=0)] == [kept.id]
    assert not await redis_client.exists(queue.payload_key(job.id))


async def test_delete_while_running_is_not_resurrected(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    queue = make_queue(redis_client, queue_settings)
    delivery = await submit_and_read(queue)
    await queue.delete(delivery.job_id)
    await queue.heartbeat("w1", [delivery])
    await queue.note_error(delivery, "internal", "boom")
    assert await queue.complete(delivery, result_json("late")) is False
    await queue.fail(delivery, InvalidImage("late"))
    with pytest.raises(JobNotFound):
        await queue.get(delivery.job_id)
    for key in (queue.record_key, queue.result_key, queue.payload_key):
        assert not await redis_client.exists(key(delivery.job_id))
    stats = await queue.stats()
    assert (stats.length, stats.pending) == (0, 0)


async def test_fail_keeps_the_error_and_terminal_states_are_final(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    queue = make_queue(redis_client, queue_settings)
    delivery = await submit_and_read(queue)
    await queue.fail(delivery, InvalidImage("truncated pixel data"))
    failed = await queue.get(delivery.job_id)
    assert failed.status == "failed" and failed.result is None
    assert failed.error is not None and failed.error.model_dump() == {
        "code": "invalid_image",
        "message": "truncated pixel data",
    }
    assert await queue.complete(delivery, result_json("late")) is False
    assert (await queue.get(delivery.job_id)).status == "failed"
    assert (await queue.stats()).dead_letters == 0  # input errors are not dead-lettered

    succeeded = await submit_and_read(queue)
    assert await queue.complete(succeeded, result_json("ok"))
    await queue.fail(succeeded, InvalidImage("too late"))
    assert (await queue.get(succeeded.job_id)).status == "succeeded"


async def test_unknown_garbage_and_expired_ids(redis_client: aioredis.Redis, queue_settings: QueueSettings) -> None:
    queue = make_queue(redis_client, queue_settings)
    for job_id in (new_job_id(), "../../etc/passwd", "", "x" * 22 + "*", "c2p:jobs", "a b" * 8):
        with pytest.raises(JobNotFound):
            await queue.get(job_id)
        with pytest.raises(JobNotFound):
            await queue.delete(job_id)
    await queue.ensure_group()
    expired = await queue.submit(FILES, META, tenant="t1")
    await redis_client.pexpire(queue.record_key(expired.id), 1)
    await asyncio.sleep(0.01)
    with pytest.raises(JobNotFound):
        await queue.get(expired.id)
    assert await queue.read("w1", count=10, block_ms=0) == []  # skipped and removed
    assert (await queue.stats()).length == 0


async def test_an_expired_upload_fails_the_job(redis_client: aioredis.Redis, queue_settings: QueueSettings) -> None:
    queue = make_queue(redis_client, queue_settings)
    await queue.ensure_group()
    job = await queue.submit(FILES, META, tenant="t1")
    await redis_client.delete(queue.payload_key(job.id))  # as if payload_ttl_s ran out in the queue
    assert await queue.read("w1", count=10, block_ms=0) == []
    failed = await queue.get(job.id)
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "unavailable"

    delivery = await submit_and_read(queue)
    await redis_client.delete(queue.payload_key(delivery.job_id))
    with pytest.raises(JobNotFound):
        await queue.payload(delivery, max_bytes=1 << 20)


async def test_duplicate_delivery_first_result_wins(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    queue = make_queue(redis_client, queue_settings, lease_s=0.2)
    slow = await submit_and_read(queue, "slow")
    await asyncio.sleep(0.25)
    (again,) = await queue.reclaim("fast")
    assert again.job_id == slow.job_id and again.entry_id == slow.entry_id and again.deliveries == 2
    assert again.meta == META
    assert (await queue.get(slow.job_id)).deliveries == 2
    assert await queue.complete(again, result_json("fast")) is True
    assert await queue.complete(slow, result_json("slow")) is False
    done = await queue.get(slow.job_id)
    assert done.result is not None and done.result.model.name == "fast"
    stats = await queue.stats()
    assert (stats.length, stats.pending, stats.dead_letters) == (0, 0, 0)


async def test_reclaim_then_dead_letter(redis_client: aioredis.Redis, queue_settings: QueueSettings) -> None:
    queue = make_queue(redis_client, queue_settings, lease_s=0.2, max_deliveries=2)
    first = await submit_and_read(queue, "w1")
    assert await queue.reclaim("w2") == []  # not idle long enough yet
    await asyncio.sleep(0.25)
    (second,) = await queue.reclaim("w2")
    assert second.deliveries == 2
    await queue.note_error(second, "internal", "RuntimeError: CUDA error: an illegal memory access")
    assert (await queue.get(first.job_id)).status == "running"  # a noted error is not a failure
    await asyncio.sleep(0.25)
    assert await queue.reclaim("w3") == []  # a third delivery is over the limit
    failed = await queue.get(first.job_id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == DeliveryLimit.code == "delivery_limit"
    assert "2 times" in failed.error.message and "illegal memory access" in failed.error.message
    (entry,) = await redis_client.xrange(queue.dead)
    fields = entry[1]
    assert fields[b"job_id"].decode() == first.job_id and fields[b"error_code"] == b"delivery_limit"
    assert fields[b"deliveries"] == b"2"
    stats = await queue.stats()
    assert (stats.length, stats.pending, stats.dead_letters) == (0, 0, 1)
    assert await queue.complete(second, result_json("too late")) is False


async def test_a_dead_letter_without_a_noted_error_says_so(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    queue = make_queue(redis_client, queue_settings, lease_s=0.1, max_deliveries=1)
    delivery = await submit_and_read(queue)
    await asyncio.sleep(0.15)
    assert await queue.reclaim("w2") == []
    error = (await queue.get(delivery.job_id)).error
    assert error is not None and "1 times" in error.message and "no error was recorded" in error.message


async def test_heartbeat_keeps_a_live_job(redis_client: aioredis.Redis, queue_settings: QueueSettings) -> None:
    queue = make_queue(redis_client, queue_settings, lease_s=0.3)
    delivery = await submit_and_read(queue, "alive")
    for _ in range(4):
        await asyncio.sleep(0.12)
        await queue.heartbeat("alive", [delivery])
        assert await queue.reclaim("janitor") == []
    await asyncio.sleep(0.35)  # heartbeats stop: the worker is presumed dead
    (taken,) = await queue.reclaim("janitor")
    assert taken.deliveries == 2  # heartbeats did not count as deliveries
    await queue.heartbeat("alive", [delivery])  # the old owner cannot take it back
    pending = await redis_client.xpending_range(queue.stream, queue.group, "-", "+", 10)
    assert [p["consumer"] for p in pending] == [b"janitor"]


async def test_release_makes_a_job_reclaimable_at_once(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    queue = make_queue(redis_client, queue_settings, lease_s=60)
    delivery = await submit_and_read(queue, "leaving")
    assert await queue.reclaim("other") == []
    await queue.release("leaving", [delivery])
    assert (await queue.get(delivery.job_id)).status == "queued"
    (taken,) = await queue.reclaim("other")
    assert taken.job_id == delivery.job_id and taken.deliveries == 2
    assert (await queue.get(delivery.job_id)).status == "running"
    await queue.release("leaving", [delivery])  # no longer its entry: nothing happens
    assert await queue.reclaim("third") == []
    assert await queue.forget_consumer("leaving") is True
    assert await queue.forget_consumer("other") is False  # still owns an entry
    assert (await queue.stats()).consumers == 1


async def test_reclaim_cleans_entries_deleted_behind_its_back(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    """An entry XDEL'd while pending: Redis 6.2 returns it as nil without its id, 7 drops it itself."""
    queue = make_queue(redis_client, queue_settings, lease_s=0.1)
    delivery = await submit_and_read(queue)
    await redis_client.xdel(queue.stream, delivery.entry_id)
    await asyncio.sleep(0.15)
    assert await queue.reclaim("w2") == []
    assert (await queue.stats()).pending == 0


async def test_stats_counts_lag_on_redis_7(redis_client: aioredis.Redis, queue_settings: QueueSettings) -> None:
    queue = make_queue(redis_client, queue_settings)
    await queue.ensure_group()
    for _ in range(3):
        await queue.submit(FILES, META, tenant="t1")
    await queue.read("w1", count=1, block_ms=0)
    stats = await queue.stats()
    assert (stats.length, stats.pending, stats.consumers) == (3, 1, 1)
    version = (await redis_client.info("server"))["redis_version"]
    if int(str(version).split(".")[0]) >= 7:
        assert stats.lag == 2
    else:
        assert stats.lag is None


async def test_read_recreates_a_lost_group(redis_client: aioredis.Redis, queue_settings: QueueSettings) -> None:
    queue = make_queue(redis_client, queue_settings)
    job = await queue.submit(FILES, META, tenant="t1")  # before any worker created the group
    (delivery,) = await queue.read("w1", count=1, block_ms=0)
    assert delivery.job_id == job.id
    assert await queue.reclaim("w1") == []
    fresh = make_queue(redis_client, queue_settings, prefix=queue_settings.prefix + ":fresh")
    assert await fresh.reclaim("w1") == []  # the janitor may run before the reader created the group


async def test_a_name_the_container_cannot_hold_is_a_bad_request(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    queue = make_queue(redis_client, queue_settings)
    with pytest.raises(InvalidRequest):
        await queue.submit([("x" * 70_000, b"")], META, tenant="t1")
    assert (await queue.stats()).length == 0


async def test_redis_down_means_unavailable() -> None:
    settings = QueueSettings(prefix="tdown")
    with PrivateRedis() as server:
        client = aioredis.Redis.from_url(server.url)
        queue = JobQueue(client, settings, lane=LANE)
        try:
            assert await queue.ping() is True
            job = await queue.submit(FILES, META, tenant="t1")
            server.stop()
            assert await queue.ping() is False
            calls = (
                lambda: queue.submit(FILES, META, tenant="t1"),
                lambda: queue.get(job.id),
                lambda: queue.delete(job.id),
                lambda: queue.wait(job.id, 1),
                lambda: queue.stats(),
                lambda: queue.read("w1", 1, 0),
            )
            for call in calls:
                with pytest.raises(Unavailable, match="redis is not answering"):
                    await call()
        finally:
            await client.aclose()


async def test_delete_if_queued_leaves_running_jobs_alone(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    queue = make_queue(redis_client, queue_settings)
    await queue.ensure_group()
    waiting = await queue.submit([("a.png", b"x")], {}, tenant="t1")
    assert await queue.delete_if_queued(waiting.id)
    with pytest.raises(JobNotFound):
        await queue.get(waiting.id)
    assert not await queue.delete_if_queued(waiting.id)  # gone already

    running = await submit_and_read(queue)
    assert not await queue.delete_if_queued(running.job_id)
    assert (await queue.get(running.job_id)).status == "running"
    assert await queue.complete(running, result_json("c2p-test-64"))


async def test_every_way_a_job_ends_gives_its_tenant_slot_back(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    """The per-tenant count must not drift: succeeded, failed, dead-lettered, deleted (queued and running), payload
    expired, record expired; and a delete racing a read must not give the slot back twice."""
    queue = make_queue(redis_client, queue_settings, tenant_max_pending=1, lease_s=0.1, max_deliveries=1)

    async def held() -> dict[bytes, bytes]:
        return await redis_client.hgetall(queue.tenants)

    async def one() -> Delivery:
        delivery = await submit_and_read(queue)
        assert await held() == {b"t1": b"1"}
        with pytest.raises(QueueFull, match="tenant"):
            await queue.submit(FILES, META, tenant="t1")
        await queue.submit(FILES, META, tenant="t2")  # another tenant is not held back
        await queue.delete((await queue.read("w9", count=1, block_ms=0))[0].job_id)
        return delivery

    assert await queue.complete(await one(), result_json("m"))
    assert await held() == {}
    await queue.fail(await one(), InvalidImage("broken"))
    assert await held() == {}
    dead = await one()
    await asyncio.sleep(0.2)
    assert await queue.reclaim("w2") == []  # over max_deliveries: failed and dead-lettered
    assert (await queue.get(dead.job_id)).error.code == "delivery_limit"
    assert await held() == {}
    running = await one()
    await queue.delete(running.job_id, tenant="t1")
    assert await held() == {}
    assert not await queue.complete(running, result_json("m"))  # the late worker changes nothing
    assert await held() == {}

    queued = await queue.submit(FILES, META, tenant="t1")
    with pytest.raises(JobNotFound):
        await queue.delete(queued.id, tenant="t2")  # another tenant's delete: unknown, and nothing released
    assert await held() == {b"t1": b"1"}
    await queue.delete(queued.id, tenant="t1")
    assert await held() == {}

    expired_payload = await queue.submit(FILES, META, tenant="t1")
    await redis_client.delete(queue.payload_key(expired_payload.id))
    assert await queue.read("w1", count=1, block_ms=0) == []  # failed at start: the upload expired
    assert await held() == {}
    expired_record = await queue.submit(FILES, META, tenant="t1")
    await redis_client.delete(queue.record_key(expired_record.id))
    assert await queue.read("w1", count=1, block_ms=0) == []  # dropped: the record expired, its entry remained
    assert await held() == {}


async def test_an_idempotency_key_makes_a_retried_submit_return_the_first_job(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    queue = make_queue(redis_client, queue_settings)
    first = await queue.submit(FILES, META, tenant="t1", idempotency_key="study-42")
    again = await queue.submit(FILES, META, tenant="t1", idempotency_key="study-42")
    assert again.id == first.id
    assert await queue.delete_if_queued(first.id) is False  # the first caller gave up: the retry still waits on it
    other_tenant = await queue.submit(FILES, META, tenant="t2", idempotency_key="study-42")
    assert other_tenant.id != first.id  # keys are per tenant
    racing = await asyncio.gather(*(queue.submit(FILES, META, tenant="t1", idempotency_key="k2") for _ in range(20)))
    assert len({job.id for job in racing}) == 1  # concurrent retries: one job
    stats = await queue.stats()
    assert stats.length == 3
    assert await redis_client.hget(queue.tenants, "t1") == b"2"  # one slot per job, not per request


async def test_a_repeat_without_a_key_within_the_window_is_the_same_job_unless_it_failed(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    queue = make_queue(redis_client, queue_settings, dedupe_window_s=0.5)
    first = await queue.submit(FILES, META, tenant="t1")
    assert (await queue.submit(FILES, {**META, "submitted_at": "later"}, tenant="t1")).id == first.id
    assert (await queue.submit(FILES, {**META, "modality_hint": "CT"}, tenant="t1")).id != first.id  # other options
    assert (await queue.submit(FILES[:1], META, tenant="t1")).id != first.id  # other files
    await asyncio.sleep(0.6)
    assert (await queue.submit(FILES, META, tenant="t1")).id != first.id  # past the window: a new job
    keyed = await queue.submit(FILES, META, tenant="t1", idempotency_key="x")
    (taken,) = [d for d in await queue.read("w1", 50, block_ms=0) if d.job_id == keyed.id]
    await queue.fail(taken, InvalidImage("bad"))
    assert (await queue.submit(FILES, META, tenant="t1", idempotency_key="x")).id != keyed.id  # it failed: anew
    window = make_queue(redis_client, queue_settings, dedupe_window_s=5)
    failed_first = await window.submit([("z.png", b"z")], META, tenant="t9")
    (taken,) = [d for d in await window.read("w9", 50, block_ms=0) if d.job_id == failed_first.id]
    await window.fail(taken, InvalidImage("bad"))
    assert (await window.submit([("z.png", b"z")], META, tenant="t9")).id != failed_first.id


async def test_a_submit_run_twice_by_a_client_retry_takes_one_slot(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    """redis-py retries a command on a fresh connection when the first one dropped; if the script had run, the
    second run of it must find its own record, not add a second entry and take a second slot."""
    from service.queue.admission import _SUBMIT

    queue = make_queue(redis_client, queue_settings)
    job = await queue.submit(FILES, META, tenant="t1")
    script = redis_client.register_script(_SUBMIT)
    keys = [queue.stream, queue.record_key(job.id), queue.payload_key(job.id), queue.tenants, "unused"]
    args = [100, job.id, "now", "{}", 60, "t1", 0, LANE, 0, queue.record_key("")]
    again = await script(keys=keys, args=args)
    assert again == await redis_client.hget(queue.record_key(job.id), "stream_id")
    assert (await queue.stats()).length == 1
    assert await redis_client.hget(queue.tenants, "t1") == b"1"


async def test_an_expired_record_past_the_delivery_limit_gives_its_slot_back(
    redis_client: aioredis.Redis, queue_settings: QueueSettings
) -> None:
    queue = make_queue(redis_client, queue_settings, lease_s=0.05, max_deliveries=1)
    delivery = await submit_and_read(queue)
    assert await redis_client.hget(queue.tenants, "t1") == b"1"
    await redis_client.delete(queue.record_key(delivery.job_id))  # the record expired while the entry waited
    await asyncio.sleep(0.1)
    assert await queue.reclaim("w2") == []  # past the limit: dead-lettered, nothing to run
    assert await redis_client.hget(queue.tenants, "t1") is None
    assert (await queue.stats()).length == 0
