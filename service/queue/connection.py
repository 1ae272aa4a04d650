"""Talking to Redis: the one client configuration every process uses, and what an outage looks like to callers.

Why a module of its own: a restarted or failed-over Redis must look the same everywhere, as a retried command
and then one error (Unavailable: 503 / UNAVAILABLE) that callers know how to handle, never as a driver exception
leaking out of a gateway handler or costing a worker a delivery. Keeping the retry policy and the translation in
one place is what keeps every part of the queue answering alike.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from service.errors import Unavailable

# BusyLoadingError (an AOF being replayed) is a ConnectionError; OSError covers socket and timeout errors.
_UNAVAILABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.ReadOnlyError, rexc.OutOfMemoryError, OSError)
_URL_CREDENTIALS = re.compile(r"(\w+://)[^@/\s]*@")

P = ParamSpec("P")
T = TypeVar("T")


def _describe(exc: BaseException) -> str:
    text = _URL_CREDENTIALS.sub(r"\1", str(exc)) or type(exc).__name__
    return f"redis is not answering: {text}"


def redis_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Redis outages become Unavailable (503 / UNAVAILABLE), the one error callers handle for them."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except _UNAVAILABLE as exc:
            raise Unavailable(_describe(exc)) from exc

    return wrapper


def text(value: bytes | str | None) -> str | None:
    """A reply from the queue's client (decode_responses=False) as text."""
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


async def ping(client: aioredis.Redis, timeout_s: float = 2.0) -> bool:
    """For readiness probes: False rather than an exception, and bounded even if Redis hangs."""
    try:
        async with asyncio.timeout(timeout_s):
            return bool(await client.ping())
    except (RedisError, OSError):  # TimeoutError is an OSError
        return False
