"""Redis for the service tests: REDIS_URL when set (CI's service container), else a private server.

One private server per session (starting one costs ~20 ms, but a session-wide one also checks that
tests keep to their own keys): every test gets its own key prefix, so tests never see each other's
jobs, and the keys are removed afterwards so a shared REDIS_URL does not fill up.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from uuid import uuid4

import pytest
import redis.asyncio as aioredis

from service.config import QueueSettings
from service.queue.redis_server import PrivateRedis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    with PrivateRedis(unix_socket=True) as server:
        yield server.url


@pytest.fixture
def queue_settings() -> QueueSettings:
    """A fresh prefix per test. The rule that answers a repeated upload with its first job (dedupe_window_s) is off:
    tests send one image many times on purpose (quotas, caps, formats); tests/service/test_retries.py and
    test_queue.py test the rule itself."""
    return QueueSettings(prefix=f"t{uuid4().hex[:8]}", dedupe_window_s=0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def redis_client(redis_url: str, queue_settings: QueueSettings) -> AsyncIterator[aioredis.Redis]:
    """A client for ``@pytest.mark.anyio`` tests (bytes replies, as JobQueue wants); the test's keys go after."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=False)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{queue_settings.prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
