"""A running service for tests: the real gateway app and a real worker on one event loop, real Redis.

The app is driven through httpx's ASGI transport (no port), the worker reads the same Redis as the
gateway, so every request goes the whole path: upload -> probe -> queue -> worker -> result.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import redis.asyncio as aioredis
from PIL import Image

from service.config import EngineSettings, QueueSettings, Settings, WorkerSettings
from service.gateway.app import create_app
from service.ops.metrics import Metrics
from service.queue.keys import lane_of
from service.worker.consumer import Worker
from service.worker.engine import Engine, load_engine

_ENGINES: dict[Path, Engine] = {}


def engine_for(exported: Path) -> Engine:
    """One ONNX session per export folder for the whole test session (loading costs a second)."""
    if exported not in _ENGINES:
        _ENGINES[exported] = load_engine(exported, EngineSettings(max_batch_size=8, intra_op_threads=1))
    return _ENGINES[exported]


def lane_for(exported: Path) -> str:
    """The stream lane jobs for the model in ``exported`` go to (the first 12 hex digits of its artifact digest)."""
    card = json.loads((exported / "card.json").read_text())
    return lane_of(card["artifacts"]["model.onnx"]["sha256"])


def make_settings(redis_url: str, queue: QueueSettings, exported: Path, **worker: object) -> Settings:
    return Settings(
        redis_url=redis_url,
        model=str(exported),
        engine=EngineSettings(max_batch_size=8, intra_op_threads=1, warmup=False),
        queue=queue,
        worker=WorkerSettings(**{"janitor_interval_s": 0.2, "heartbeat_s": 0.2, **worker}),
    )


@contextlib.asynccontextmanager
async def running(
    settings: Settings, engine: Engine | None, *, worker: bool = True
) -> AsyncIterator[tuple[httpx.AsyncClient, Worker | None]]:
    client = aioredis.Redis.from_url(settings.redis_url)
    metrics = Metrics()
    app = create_app(settings, metrics, client)
    runner = Worker(settings, engine, client, metrics, consumer="test-worker") if worker and engine else None
    task = None
    try:
        async with app.router.lifespan_context(app):
            if runner is not None:
                task = asyncio.create_task(runner.run())
                await asyncio.wait_for(runner.ready.wait(), 10)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://c2p.test") as http:
                yield http, runner
    finally:
        if runner is not None and task is not None:
            runner.stop()
            await asyncio.wait_for(task, 30)
        await client.aclose()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def disc_image(size: tuple[int, int] = (96, 128), radius: int = 20) -> np.ndarray:
    yy, xx = np.mgrid[: size[0], : size[1]]
    image = np.full(size, 40, dtype=np.uint8)
    image[(yy - size[0] // 2) ** 2 + (xx - size[1] // 2) ** 2 < radius**2] = 200
    return image


@contextlib.asynccontextmanager
async def serving_http(settings: Settings, engine: Engine | None, port: int | None = None) -> AsyncIterator[str]:
    """The gateway under uvicorn on a loopback port (free unless given), with a worker on the same loop: for peers
    that need a real socket (a PACS pushing STOW-RS, a browser). Yields the base URL."""
    import uvicorn

    port = port or free_port()
    client = aioredis.Redis.from_url(settings.redis_url)
    metrics = Metrics()
    app = create_app(settings, metrics, client)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    serve = asyncio.create_task(server.serve())
    runner = Worker(settings, engine, client, metrics, consumer="http-test-worker") if engine else None
    work = asyncio.create_task(runner.run()) if runner else None
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.05)
        assert server.started, "uvicorn did not start"
        if runner is not None:
            await asyncio.wait_for(runner.ready.wait(), 10)
        yield f"http://127.0.0.1:{port}"
    finally:
        if runner is not None and work is not None:
            runner.stop()
            await asyncio.wait_for(work, 30)
        server.should_exit = True
        await asyncio.wait_for(serve, 15)
        await client.aclose()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
