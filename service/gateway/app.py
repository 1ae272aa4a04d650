"""The HTTP gateway, composed: the /v1 API (rest.py), the Open Inference Protocol (kserve.py), DICOMweb STOW-RS
(dicomweb.py) and the viewer (ui.py) on one FastAPI app, with health, metrics, the body limit and the error handlers.

Uploads in, jobs out: a gateway parses headers, never pixels. Bad input is refused at once, with a 4xx from the
shared error table, before anything reaches the queue; pixels are decoded by workers, so a gateway stays small and
fast whatever the upload. Liveness depends on nothing; readiness needs Redis and at least one warm worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.access import Access
from service.auth import Authenticator
from service.config import Settings
from service.dataplane.assembly import assemble, quiet_period
from service.dataplane.models import ModelDirectory, ready_workers
from service.errors import InvalidRequest, ServiceError, Unavailable
from service.gateway import dicomweb, kserve, rest, ui
from service.gateway.identity import caller
from service.gateway.rejected import RejectedLog
from service.gateway.rest import API, error_response
from service.gateway.uploads import BodyLimit
from service.ops.metrics import Metrics
from service.queue import JobQueue, connect
from service.queue.memory import check_eviction
from service.schema import ErrorInfo

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 5.0
access_log = logging.getLogger("c2p.access")


def create_app(
    settings: Settings,
    metrics: Metrics | None = None,
    client: aioredis.Redis | None = None,
    authenticator: Authenticator | None = None,
) -> FastAPI:
    """The ASGI app. ``client`` lets tests and the embedded mode share a connection pool; ``authenticator`` lets
    the REST and gRPC servers of one process share one (built here from the settings otherwise, so a broken key
    file stops the start-up)."""
    metrics = metrics or Metrics()
    authenticator = authenticator or Authenticator(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = client is None
        redis_client = client or connect(settings.redis_url or "redis://127.0.0.1:6379/0")
        app.state.redis = redis_client
        app.state.queue = JobQueue(redis_client, settings.queue)
        app.state.models = ModelDirectory.for_settings(redis_client, settings)
        app.state.access = Access(settings, redis_client, authenticator)
        await check_eviction(redis_client, settings.queue)
        stopping = asyncio.Event()
        stats = asyncio.create_task(_refresh_stats(app.state.queue, app.state.models, metrics, stopping))
        background = [stats]
        if quiet_period(settings) > 0:
            background.append(asyncio.create_task(assemble(app.state.queue, app.state.models, settings, stopping)))
        try:
            yield
        finally:
            # An event, not cancel(): redis-py can swallow a cancellation that lands mid-command,
            # which would hang the shutdown on gather().
            stopping.set()
            await asyncio.gather(*background, return_exceptions=True)
            if own:
                await redis_client.aclose()

    app = FastAPI(
        title="c2p-serve",
        version="1",
        summary="Prompt-free universal medical image segmentation (C2P): masks with reliability.",
        lifespan=lifespan,
    )
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.limits.max_upload_bytes,
        max_concurrent=settings.limits.max_concurrent_uploads,
        retry_after_s=settings.queue.retry_after_s,
    )
    app.add_middleware(RejectedLog)  # added last: outside BodyLimit, so it sees every answer
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.access = Access(settings, client, authenticator)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, err: ServiceError) -> JSONResponse:
        metrics.request_failure.labels(API, err.code).inc()
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:5])
        return await service_error(request, InvalidRequest(problems or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            return JSONResponse({"code": "not_found", "message": "no such route"}, status_code=404)
        if err.status_code == 405:
            return JSONResponse({"code": "method_not_allowed", "message": str(err.detail)}, status_code=405)
        return await service_error(request, InvalidRequest(str(err.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        metrics.request_failure.labels(API, "internal").inc()
        return JSONResponse({"code": "internal", "message": "internal error"}, status_code=500)

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", responses={503: {"model": ErrorInfo}})
    async def ready(request: Request) -> Any:
        try:
            workers = await ready_workers(request.app.state.queue, request.app.state.redis, settings.queue.prefix)
        except Unavailable as err:
            return error_response(err)
        models = sorted({f"{m.get('name')}:{m.get('version')}" for w in workers for m in w.get("models") or []})
        return {"ready": True, "workers": len(workers), "models": models}

    app.include_router(rest.router)
    app.include_router(kserve.router)
    app.include_router(dicomweb.router)
    app.include_router(ui.router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        if not authenticator.public_metrics:
            await caller(request)
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    return app


async def _refresh_stats(queue: JobQueue, models: ModelDirectory, metrics: Metrics, stopping: asyncio.Event) -> None:
    """Stream gauges for /metrics and autoscalers, summed over the models' streams, refreshed in the background
    (never per scrape)."""
    while not stopping.is_set():
        try:
            lanes = sorted({v.lane for v in await models.versions()})
            every = [await queue.stats(lane) for lane in lanes]
            metrics.stream_length.set(sum(s.length for s in every))
            metrics.stream_pending.set(sum(s.pending for s in every))
            lags = [s.lag for s in every if s.lag is not None]
            if lags:
                metrics.stream_lag.set(sum(lags))
            if every:
                metrics.dead_letters.set(every[0].dead_letters)
        except (ServiceError, RedisError, OSError):
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), STATS_INTERVAL_S)
