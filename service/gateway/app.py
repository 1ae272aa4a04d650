"""The REST gateway: uploads in, jobs out. It parses headers, never pixels.

Bad input is refused here, at once, with a 4xx from the shared error table, before anything reaches
the queue; pixels are decoded by workers, so a gateway stays small and fast whatever the upload.
Liveness depends on nothing; readiness needs Redis and at least one warm worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import outputs, presence
from service.access import Access
from service.auth import Authenticator
from service.config import Settings
from service.errors import InvalidRequest, ResultNotReady, ServiceError, Unauthenticated, Unavailable, from_code
from service.gateway import dicomweb, kserve, ui
from service.gateway.identity import APIS, WWW_AUTHENTICATE, Caller, caller
from service.gateway.uploads import BodyLimit, read_files
from service.metrics import Metrics
from service.queue import JobQueue, connect
from service.schema import ErrorInfo, Job
from service.submit import submit_upload

log = logging.getLogger(__name__)
access_log = logging.getLogger("c2p.access")

API = "rest"
MODALITIES = ("CT", "MR", "US", "XR", "DX", "CR", "MG", "OCT", "OP", "ES", "SM", "XC", "RGB")
STATS_INTERVAL_S = 5.0

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorInfo, "description": description}
    for status, description in (
        (400, "malformed request"),
        (401, "missing or invalid credentials"),
        (404, "unknown, expired or deleted job"),
        (413, "upload or declared image over the limits"),
        (415, "not DICOM, NIfTI, PNG, JPEG or a zip of DICOM"),
        (422, "broken or unsupported image, or a job that failed on it"),
        (429, "queue full: retry after the Retry-After header's seconds"),
        (503, "Redis or workers unavailable"),
    )
}


def error_response(err: ServiceError, job_id: str | None = None) -> JSONResponse:
    body: dict[str, Any] = err.body()
    if job_id is not None:
        body["job_id"] = job_id
    headers = {}
    retry_after = getattr(err, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if isinstance(err, Unauthenticated):
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    return JSONResponse(body, status_code=err.http_status, headers=headers)


# A 4xx answer's body is read this far for its error code (error bodies are a few hundred bytes).
ERROR_BODY_PEEK = 4096
ERROR_CODE_STATE = "error_code"  # request.state key for answers whose body has no "code" (STOW-RS's 409)


class RejectedLog:
    """ASGI middleware: one INFO line on ``c2p.access`` for every request answered 4xx, whichever path answered it
    (the error handlers below, the Open Inference Protocol's v2 errors, STOW-RS, an unknown route).

    The line holds the API, status, error code, method, route template (``/v1/segmentations/{job_id}``; the raw
    path only where no route matched) and the caller's tenant once known; never the query string, the message or
    anything else of the request, so no patient data reaches it. The code is the ``code`` of the answer's JSON body
    (both error shapes carry one) unless a handler put one in ``request.state.error_code``. 5xx answers are logged
    where they happen, as before."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})  # the dict request.state writes to, so the principal is seen here
        status = 0
        json_body = False
        body = bytearray()

        async def watched(message: Message) -> None:
            nonlocal status, json_body
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers", ()))
                json_body = b"json" in headers.get(b"content-type", b"")
            elif message["type"] == "http.response.body" and 400 <= status < 500 and json_body:
                body.extend(message.get("body", b"")[: ERROR_BODY_PEEK - len(body)])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            if 400 <= status < 500:
                log_rejected(scope, status, bytes(body))


def log_rejected(scope: Scope, status: int, body: bytes) -> None:
    state = scope.get("state") or {}
    code = state.get(ERROR_CODE_STATE) or _body_code(body) or "-"
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None) or scope.get("path", "")
    path = scope.get("path", "")
    entry: dict[str, str | int] = {
        "event": "rejected",
        "api": next((name for prefix, name in APIS if path.startswith(prefix)), API),
        "status": status,
        "code": str(code),
        "method": str(scope.get("method", "")),
        "route": str(template),
    }
    principal = state.get("principal")
    if principal is not None:
        entry["tenant"] = principal.tenant
    access_log.info("%s", json.dumps(entry, separators=(",", ":")))


def _body_code(body: bytes) -> str | None:
    try:
        value = json.loads(body)
    except ValueError:  # not JSON, or cut off at the peek
        return None
    code = value.get("code") if isinstance(value, dict) else None
    return code if isinstance(code, str) else None


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
        app.state.access = Access(settings, redis_client, authenticator)
        stopping = asyncio.Event()
        stats = asyncio.create_task(_refresh_stats(app.state.queue, metrics, stopping))
        try:
            yield
        finally:
            # An event, not cancel(): redis-py can swallow a cancellation that lands mid-command,
            # which would hang the shutdown on gather().
            stopping.set()
            await asyncio.gather(stats, return_exceptions=True)
            if own:
                await redis_client.aclose()

    app = FastAPI(
        title="c2p-serve",
        version="1",
        summary="Prompt-free universal medical image segmentation (C2P): masks with reliability.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_upload_bytes)
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

    def queue_of(request: Request) -> JobQueue:
        return request.app.state.queue

    def access_of(request: Request) -> Access:
        return request.app.state.access

    @app.post(
        "/v1/segmentations",
        status_code=202,
        response_model=Job,
        responses={200: {"model": Job, "description": "finished within ?wait"}, **ERROR_RESPONSES},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {
                                "file": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                    "description": "DICOM file(s) of one series, a zip of them, NIfTI, PNG or JPEG",
                                }
                            },
                        }
                    }
                },
            }
        },
    )
    async def submit(
        request: Request,
        response: Response,
        principal: Caller,
        wait: Annotated[float | None, Query(ge=0, description="seconds to wait for the result")] = None,
        modality: Annotated[str | None, Query(description="modality hint for NIfTI/PNG/JPEG, e.g. CT, MR, US")] = None,
    ) -> Any:
        started = time.perf_counter()
        if wait is not None and wait > settings.queue.max_wait_s:
            raise InvalidRequest(f"wait may be at most {settings.queue.max_wait_s:g} seconds")
        hint = _modality(modality)
        files = await read_files(request, settings.limits)
        queue = queue_of(request)
        job = await submit_upload(
            queue, files, settings.limits, hint, tenant=principal.tenant, trace_parent=request.headers
        )
        del files
        await access_of(request).record("submit", principal, API, job.id)
        location = f"/v1/segmentations/{job.id}"
        if wait:
            job = await queue.wait(job.id, wait, tenant=principal.tenant)
        if job.status == "failed" and job.error is not None:
            metrics.request_failure.labels(API, job.error.code).inc()
            return error_response(from_code(job.error.code, job.error.message), job.id)
        metrics.succeeded(API, started)
        if job.status == "succeeded":
            response.status_code = 200
        response.headers["Location"] = location
        return job

    @app.get("/v1/segmentations/{job_id}", response_model=Job, responses=ERROR_RESPONSES)
    async def get_job(request: Request, job_id: str, principal: Caller) -> Job:
        job = await queue_of(request).get(job_id, tenant=principal.tenant)
        await access_of(request).record("read", principal, API, job_id)
        return job

    @app.get(
        "/v1/segmentations/{job_id}/result",
        responses={
            200: {
                "description": "the result in the format asked for",
                "content": {media: {} for media in outputs.MEDIA_TYPES.values()},
            },
            409: {"model": ErrorInfo, "description": "the job is still queued or running"},
            **ERROR_RESPONSES,
        },
    )
    async def get_result(
        request: Request,
        job_id: str,
        principal: Caller,
        fmt: Annotated[str, Query(alias="format", description="json, dicom-seg, nifti or png")] = "json",
        index: Annotated[int | None, Query(alias="slice", ge=0, description="png: slice (default: largest)")] = None,
    ) -> Response:
        """The finished result as JSON, a DICOM SEG (DICOM inputs), a NIfTI labelmap on the input's grid, or a PNG
        overlay of one slice; made on request from the result and what the worker kept with it."""
        outputs.check_format(fmt)
        if index is not None and fmt != "png":
            raise InvalidRequest("slice applies to format=png only")
        queue = queue_of(request)
        job = await queue.get(job_id, tenant=principal.tenant)
        if job.status == "failed" and job.error is not None:
            return error_response(from_code(job.error.code, job.error.message), job.id)
        if job.status != "succeeded" or job.result is None:
            raise ResultNotReady(f"the job is {job.status}; ask again when it has succeeded")
        result = job.result
        budget = 4 * settings.limits.max_voxels + settings.limits.max_upload_bytes  # preview + headers, raw
        members = await queue.outputs(job_id, outputs.needed(fmt, index, result), budget)
        body = await run_in_threadpool(outputs.render, fmt, result, members, index)
        await access_of(request).record("fetch", principal, API, job_id, format=fmt)
        name = f"{job_id}{outputs.EXTENSIONS[fmt]}"
        return Response(
            body,
            media_type=outputs.MEDIA_TYPES[fmt],
            headers={"Content-Disposition": f'inline; filename="{name}"', "Cache-Control": "private, max-age=60"},
        )

    @app.delete("/v1/segmentations/{job_id}", status_code=204, responses=ERROR_RESPONSES)
    async def delete_job(request: Request, job_id: str, principal: Caller) -> Response:
        await queue_of(request).delete(job_id, tenant=principal.tenant)
        await access_of(request).record("delete", principal, API, job_id)
        return Response(status_code=204)

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", responses={503: {"model": ErrorInfo}})
    async def ready(request: Request) -> Any:
        queue = queue_of(request)
        if not await queue.ping():
            return error_response(Unavailable("redis is not answering"))
        try:
            workers = await presence.ready_workers(request.app.state.redis, settings.queue.prefix)
        except (RedisError, OSError):
            return error_response(Unavailable("redis is not answering"))
        if not workers:
            return error_response(Unavailable("no worker has warmed up a model yet"))
        return {"ready": True, "workers": len(workers), "models": sorted({w.get("model", "") for w in workers})}

    app.include_router(kserve.router)
    app.include_router(dicomweb.router)
    app.include_router(ui.router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        if not authenticator.public_metrics:
            await caller(request)
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    return app


def _modality(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    upper = value.upper()
    if upper not in MODALITIES:
        raise InvalidRequest(f"unknown modality {value!r}; expected one of {', '.join(MODALITIES)}")
    return upper


async def _refresh_stats(queue: JobQueue, metrics: Metrics, stopping: asyncio.Event) -> None:
    """Stream gauges for /metrics and autoscalers, refreshed in the background (never per scrape)."""
    while not stopping.is_set():
        try:
            stats = await queue.stats()
            metrics.stream_length.set(stats.length)
            metrics.stream_pending.set(stats.pending)
            if stats.lag is not None:
                metrics.stream_lag.set(stats.lag)
            metrics.dead_letters.set(stats.dead_letters)
        except (ServiceError, RedisError, OSError):
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), STATS_INTERVAL_S)
