"""A worker's own small HTTP port: Prometheus metrics and health, for a worker running without the gateway.

On Kubernetes the worker is its own Deployment: Prometheus must scrape its engine and batching metrics, and the
kubelet must be able to tell a hung worker (its event loop stuck, so this port stops answering) from a busy one.
``c2p serve`` needs none of it: the gateway's port serves the shared registry.

    GET /metrics            the worker's registry
    GET /v2/health/live     200 while the event loop answers
    GET /v2/health/ready    200 when the engine is warm, the worker takes jobs and Redis answers; 503 otherwise
                            (also while draining after SIGTERM)
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.ops.metrics import Metrics
from service.worker.consumer import Worker

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def create_ops_app(worker: Worker, metrics: Metrics, client: aioredis.Redis) -> Starlette:
    async def metrics_text(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=PROMETHEUS_TEXT)

    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> JSONResponse:
        if not worker.ready.is_set():
            return _unavailable("the engine is not warm yet")
        if worker.stopping.is_set():
            return _unavailable("the worker is draining")
        try:
            await asyncio.wait_for(client.ping(), 2.0)
        except (RedisError, OSError, TimeoutError):
            return _unavailable("redis is not answering")
        return JSONResponse({"ready": True})

    return Starlette(
        routes=[
            Route("/metrics", metrics_text),
            Route("/v2/health/live", live),
            Route("/v2/health/ready", ready),
        ]
    )


def _unavailable(message: str) -> JSONResponse:
    return JSONResponse({"code": "unavailable", "message": message}, status_code=503)
