"""The Open Inference Protocol (KServe v2) over REST, so Triton's and KServe's clients work unchanged.

Routes: ``GET /v2`` (server metadata), ``GET /v2/models/{m}[/versions/{v}]`` (model metadata), ``.../ready`` and
``POST .../infer``; ``/v2/health/live`` and ``/v2/health/ready`` are the gateway's own (app.py). The model answers to
the variant its warm workers announce (``c2p-femto-256``) and to the alias ``c2p``; its versions are the first 12 hex
digits of the served artifacts' digests, as ``result.model.digest`` reports them.

A request is one input, ``image``, UINT8 or FP32, in one of the layouts ``service.inputs.tensor`` reads (HW, HWC,
CHW, NHW, NHWC, NCHW; N becomes slices), as JSON ``data`` or as binary data after the JSON header (Triton's binary
tensor data extension, ``Inference-Header-Content-Length``; gzip/deflate request bodies too, as tritonclient can
send). JSON is for small tensors: its part of a request is capped at 64 MiB, and a mask past 16 Mi values is only
sent as binary data. Request parameters: ``layout`` (else inferred from the shape, see ``tensor.default_layout``),
``modality`` (CT, MR, ...) and ``timeout`` (microseconds, Triton's unit). The tensor becomes an ``.npy`` upload and
goes through the same probe, queue, worker and batcher as every other request: nothing here runs the model.

Outputs: ``mask`` UINT8 [slices, rows, columns] (0/1, on the input's grid), ``score`` FP32 [slices] (the reliability
score of each slice) and ``report`` BYTES [1] (the whole result JSON, as ``/v1/segmentations`` returns it). They come
back binary when asked for (``binary_data_output`` or an output's ``binary_data``, tritonclient's default), else as
JSON.

Errors have the protocol's shape, ``{"error": message}``, plus the service's ``code``; statuses come from the shared
error table (bad tensors 400 ``invalid_tensor``, limits 413, queue full 429 with Retry-After, no Redis 503). A job not
done within the wait (``queue.max_wait_s``, or the request's shorter ``timeout``) answers 504 ``deadline_exceeded``
and is deleted whatever its state: no v2 call can collect it later, so running it on would only waste a worker. A
client that hangs up stops the wait and deletes its job the same way.

The request's wire format is kserve_request.py's, its OpenAPI description kserve_openapi.py's; the protocol's model
of the service (tensors, parameters) and the wait are the data plane's, shared with the gRPC transport.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from service.auth import Principal
from service.config import Settings
from service.dataplane.jobs import failure, wait_or_delete
from service.dataplane.models import SERVER_NAME, ModelDirectory, index_entry, server_version
from service.dataplane.oip import INPUTS_METADATA, OUTPUTS_METADATA, PROPERTIES
from service.dataplane.submit import submit_upload
from service.errors import DeadlineExceeded, ServiceError
from service.gateway.identity import Caller, error_headers
from service.gateway.kserve_openapi import HEADER_LENGTH, INFER_BODY, V2_ERRORS
from service.gateway.kserve_request import build_response, parse_inference, read_body
from service.queue import JobQueue

log = logging.getLogger(__name__)

API = "kserve-rest"


# ------------------------------------------------------------------------------------------------- errors


def v2_error(request: Request, err: ServiceError) -> JSONResponse:
    """The protocol's error body (tritonclient reads ``error``), keeping the service's code beside it."""
    request.app.state.metrics.request_failure.labels(API, err.code).inc()
    return JSONResponse(
        {"error": err.message, "code": err.code}, status_code=err.http_status, headers=error_headers(err)
    )


class V2Route(APIRoute):
    """Every endpoint of this router answers errors in the v2 shape, whatever raised them (the body limit's middleware
    included), while app.py's handlers keep the ``{"code", "message"}`` shape for /v1."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as err:
                return v2_error(request, err)
            except (HTTPException, RequestValidationError):
                raise
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return v2_error(request, ServiceError("internal error"))

        return route


router = APIRouter(route_class=V2Route, tags=["Open Inference Protocol (KServe v2)"], responses=V2_ERRORS)


def _models(request: Request) -> ModelDirectory:
    return request.app.state.models  # made with the gateway's Redis client (app.py's lifespan)


@router.get("/v2", summary="Server metadata")
async def server_metadata(principal: Caller) -> Response:
    return JSONResponse({"name": SERVER_NAME, "version": server_version(), "extensions": []})


@router.get("/v2/models/{model}", summary="Model metadata")
async def model_metadata(request: Request, model: str, principal: Caller) -> Response:
    return await _metadata(request, model, None)


@router.get("/v2/models/{model}/versions/{version}", summary="Model metadata, one version")
async def model_version_metadata(request: Request, model: str, version: str, principal: Caller) -> Response:
    return await _metadata(request, model, version)


@router.get("/v2/models", summary="Repository index: every model version known, and whether it is ready")
async def model_index(request: Request, principal: Caller) -> Response:
    versions = await _models(request).versions()
    return JSONResponse({"models": [index_entry(v) for v in versions]})


async def _metadata(request: Request, model: str, version: str | None) -> Response:
    served = await _models(request).resolve(model, version)
    settings: Settings = request.app.state.settings
    properties = {**PROPERTIES, "engine": settings.engine.kind}
    if served.target is not None:
        target = served.target  # the version a request would go to; properties are strings in the protocol
        properties.update(version=target.version, digest=target.digest, ready=str(target.live).lower())
    return JSONResponse(
        {
            "name": served.name,
            "versions": list(served.versions),
            "platform": "c2p-pipeline",
            "inputs": INPUTS_METADATA,
            "outputs": OUTPUTS_METADATA,
            "properties": properties,
        }
    )


@router.get("/v2/models/{model}/ready", summary="Model readiness")
async def model_ready(request: Request, model: str) -> Response:
    return await _ready(request, model, None)


@router.get("/v2/models/{model}/versions/{version}/ready", summary="Model readiness, one version")
async def model_version_ready(request: Request, model: str, version: str) -> Response:
    return await _ready(request, model, version)


async def _ready(request: Request, model: str, version: str | None) -> Response:
    """200 while a warm worker serves the model; 503 (not ready, as /v2/health/ready) until one does."""
    served = await _models(request).ready_model(model, version)
    return JSONResponse({"name": served.name, "ready": True})


async def _client_gone(request: Request) -> None:
    """Returns when the client hangs up (the body is read by then, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@router.post("/v2/models/{model}/infer", summary="Inference", openapi_extra=INFER_BODY)
async def infer(request: Request, model: str, principal: Caller) -> Response:
    return await _infer(request, principal, model, None)


@router.post("/v2/models/{model}/versions/{version}/infer", summary="Inference, one version", openapi_extra=INFER_BODY)
async def infer_version(request: Request, model: str, version: str, principal: Caller) -> Response:
    return await _infer(request, principal, model, version)


async def _infer(request: Request, principal: Principal, model: str, version: str | None) -> Response:
    started = time.perf_counter()
    settings: Settings = request.app.state.settings
    await _models(request).route(model, version)  # an unknown model or version is refused before the body is read
    raw = await read_body(request, settings.limits)
    inference = await run_in_threadpool(parse_inference, raw, request.headers.get(HEADER_LENGTH), settings)
    del raw
    queue = JobQueue(request.app.state.redis, settings.queue)
    submitted = await submit_upload(
        queue,
        _models(request),
        [inference.upload],
        settings.limits,
        inference.modality,
        tenant=principal.tenant,
        model=model,
        version=version,
        trace_parent=request.headers,
        dedupe=False,  # the call deletes its job when it stops waiting, so no other call may share it
        layout=inference.layout,
    )
    await request.app.state.access.record("infer", principal, API, submitted.id)
    inference.upload = ("", b"")  # the queue holds it now; do not keep a second copy for the whole wait
    wait_s = settings.queue.max_wait_s
    if inference.timeout_s is not None:
        wait_s = min(wait_s, inference.timeout_s)
    job = await wait_or_delete(queue, submitted.id, wait_s, _client_gone(request))
    if (err := failure(job)) is not None:
        return v2_error(request, err)
    if job.status != "succeeded" or job.result is None:
        raise DeadlineExceeded(f"no result within {wait_s:g} s; the job was deleted")
    body, header_length = await run_in_threadpool(build_response, job, inference)
    request.app.state.metrics.succeeded(API, started)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})
