"""Process wiring for ``c2p serve``, ``c2p gateway`` and ``c2p worker``: the only place with signals.

The embedded mode runs the gateway and one worker in one event loop against a private Redis server,
the same code Kubernetes runs as separate deployments. SIGTERM and SIGINT start one graceful
shutdown for both: the gateway stops accepting and finishes its requests while the worker drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import uvicorn

from service.auth import Authenticator, check_exposure
from service.config import Settings
from service.dimse.receiver import check_exposure as dimse_exposure
from service.errors import WorkerFailed
from service.ops import tracing
from service.ops.metrics import Metrics
from service.queue import connect
from service.queue.redis_server import redis_url_or_private
from service.worker.engine import Engine
from service.worker.served import load_models
from service.worker.served import load_warm_engine as _load_warm_engine

if TYPE_CHECKING:
    from service.worker.consumer import Worker

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the runner owns the signals for every part."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _on_signals(callback: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, callback)


def load_warm_engine(settings: Settings) -> Engine:
    """The default model's engine, warmed up (``c2p segment``: one model, no queue)."""
    return _load_warm_engine(settings.model, settings)


def _client(url: str) -> aioredis.Redis:
    return connect(url)


def _http_server(settings: Settings, metrics: Metrics, client: aioredis.Redis, authenticator: Authenticator) -> _Server:
    from service.gateway.app import create_app

    app = create_app(settings, metrics, client, authenticator)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(settings.worker.drain_timeout_s) or None,
    )
    return _Server(config)


async def _serve(settings: Settings, gateway: bool, worker: bool) -> None:
    from service.worker.consumer import Worker

    metrics = Metrics()
    authenticator = Authenticator(settings)
    if gateway:
        check_exposure(settings, authenticator)  # before anything starts: an open port beyond loopback never does
        dimse_exposure(settings)
    tracing.configure(settings.tracing, "serve" if gateway and worker else "gateway" if gateway else "worker")
    url, private = redis_url_or_private(settings.redis_url, settings.cache_dir)
    client = _client(url)
    tasks: list[asyncio.Task] = []
    receiver = None
    try:
        server = _http_server(settings, metrics, client, authenticator) if gateway else None
        runner = None
        ops = None
        if worker:
            models = await asyncio.to_thread(load_models, settings)
            if any(m.engine.device == "cuda" for m in models) and metrics.watch_gpus():
                log.info("exporting GPU memory and utilisation metrics")
            runner = Worker(settings, models, client, metrics)
            if not gateway and settings.worker.ops_port:
                ops = _ops_server(settings, runner, metrics, client)

        stopping = False

        def stop() -> None:
            nonlocal stopping
            if not stopping:  # a signal, then the first part to end: one shutdown, logged once
                stopping = True
                log.info("shutting down")
            if server is not None:
                server.should_exit = True
            if runner is not None:
                runner.stop()

        _on_signals(stop)
        if runner is not None:
            tasks.append(asyncio.create_task(_worker_then(runner, ops), name="worker"))
        if ops is not None:
            tasks.append(asyncio.create_task(ops.serve(), name="ops"))
            log.info("worker metrics and health on http://%s:%d", settings.host, settings.worker.ops_port)
        rpc = None
        if gateway and settings.dimse.port:
            receiver = _dimse_receiver(settings, client)
            receiver.start()
        if gateway:
            from service.grpc.inference import inference_registration
            from service.grpc.server import build_server

            # Built and started in one step: its health loop watches a started server.
            inference = inference_registration(settings, client, metrics, authenticator)
            rpc = build_server(settings, client, metrics, services=[inference], authenticator=authenticator)
            await rpc.start()
            tasks.append(asyncio.create_task(_grpc_until(rpc, server), name="grpc"))
            log.info("grpc on %s:%d", settings.host, settings.grpc_port)
        if server is not None:
            tasks.append(asyncio.create_task(server.serve(), name="gateway"))
            where = "private" if private else "shared"
            log.info("gateway on http://%s:%d (redis: %s)", settings.host, settings.port, where)
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop()  # one part ended (or failed): end the other too
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()
    finally:
        if receiver is not None:
            await asyncio.to_thread(receiver.stop)
        await client.aclose()
        tracing.shutdown()
        if private is not None:
            private.stop()


def _dimse_receiver(settings: Settings, client: aioredis.Redis):
    from service.dataplane.models import ModelDirectory
    from service.dimse.receiver import Receiver
    from service.ops.audit import AuditLog
    from service.queue import JobQueue

    loop = asyncio.get_running_loop()
    queue = JobQueue(client, settings.queue)
    return Receiver(settings, queue, ModelDirectory.for_settings(client, settings), AuditLog(client, settings), loop)


def _ops_server(settings: Settings, runner: Worker, metrics: Metrics, client: aioredis.Redis) -> _Server:
    from service.ops.port import create_ops_app

    app = create_ops_app(runner, metrics, client)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.worker.ops_port, log_level="warning", access_log=False
    )
    return _Server(config)


async def _worker_then(runner: Worker, ops: _Server | None) -> None:
    """Run the worker; its ops port stays up while it drains (readiness says 503) and closes when it is done."""
    try:
        await runner.run()
    finally:
        if ops is not None:
            ops.should_exit = True
    if runner.failed is not None:
        raise WorkerFailed(f"the worker stopped itself: {runner.failed}")


async def _grpc_until(rpc: object, http: _Server | None) -> None:
    """Run the gRPC server until the HTTP server is told to exit, then stop it gracefully with it."""
    from service.grpc.server import stop_server

    while http is not None and not http.should_exit:
        await asyncio.sleep(0.1)
    await stop_server(rpc, grace_s=10.0)


def serve(settings: Settings, *, gateway: bool = True, worker: bool = True) -> None:
    asyncio.run(_serve(settings, gateway, worker))
