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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
import time
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from service import presence
from service.auth import Principal
from service.codecs import rle
from service.config import LimitSettings, Settings
from service.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    InvalidTensor,
    ModelNotFound,
    PayloadTooLarge,
    ServiceError,
    Unauthenticated,
    Unavailable,
    from_code,
)
from service.gateway.identity import WWW_AUTHENTICATE, Caller
from service.gateway.uploads import declared_length
from service.inputs import tensor
from service.inputs.probe import normalise_hint
from service.queue import TERMINAL, JobQueue
from service.schema import Job, SegmentationResult
from service.submit import submit_upload

log = logging.getLogger(__name__)

API = "kserve-rest"
ALIAS = "c2p"
SERVER_NAME = "c2p-serve"
INPUT = "image"
OUTPUTS = ("mask", "score", "report")
DATATYPES: dict[str, np.dtype] = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}
HEADER_LENGTH = "Inference-Header-Content-Length"
VERSION_DIGITS = 12
# JSON numbers cost ~30x their bytes once parsed into Python objects, so tensors past these sizes travel as binary
# data (the extension every Triton client uses by default) whatever the upload limit allows.
JSON_MAX_BYTES = 64 * 1024 * 1024
JSON_MAX_VALUES = 16 * 1024 * 1024
# Announcements are read with SCAN; an infer request reuses a read this recent instead of scanning per request.
WORKERS_TTL_S = 2.0
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS}


# ------------------------------------------------------------------------------------------------- errors


def v2_error(request: Request, err: ServiceError) -> JSONResponse:
    """The protocol's error body (tritonclient reads ``error``), keeping the service's code beside it."""
    request.app.state.metrics.request_failure.labels(API, err.code).inc()
    headers = {}
    retry_after = getattr(err, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if isinstance(err, Unauthenticated):
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    return JSONResponse({"error": err.message, "code": err.code}, status_code=err.http_status, headers=headers)


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


# Every error of these routes, as v2_error writes it; documented so that clients (and schemathesis) know the shape.
V2_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "code"],
    "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
}
V2_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "content": {"application/json": {"schema": V2_ERROR_SCHEMA}}}
    for status, description in (
        (400, "malformed request or tensor"),
        (401, "missing or invalid credentials"),
        (404, "unknown model or version"),
        (413, "request or tensor over the limits"),
        (422, "the job failed on this input"),
        (429, "queue full: retry after the Retry-After header's seconds"),
        (503, "Redis or workers unavailable, or the model not ready"),
        (504, "no result within the wait; the job was deleted"),
    )
}

router = APIRouter(route_class=V2Route, tags=["Open Inference Protocol (KServe v2)"], responses=V2_ERRORS)


# ------------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Served:
    """What a model name resolves to: the canonical name and the versions warm workers serve."""

    name: str
    versions: tuple[str, ...]


def _version(worker: dict[str, Any]) -> str:
    return str(worker.get("digest", ""))[:VERSION_DIGITS]


async def _workers(request: Request, fresh: bool) -> list[dict[str, Any]]:
    state = request.app.state
    cached = getattr(state, "kserve_workers", None)
    now = time.monotonic()
    if not fresh and cached is not None and now - cached[0] < WORKERS_TTL_S:
        return cached[1]
    settings: Settings = state.settings
    try:
        workers = await presence.ready_workers(state.redis, settings.queue.prefix)
    except (RedisError, OSError) as exc:
        raise Unavailable("redis is not answering") from exc
    state.kserve_workers = (now, workers)
    return workers


async def resolve(request: Request, model: str, version: str | None, fresh: bool = True) -> Served:
    """The model a name and optional version mean: 404 for names and versions nobody serves."""
    return served_by(await _workers(request, fresh), model, version)


def served_by(workers: list[dict[str, Any]], model: str, version: str | None) -> Served:
    """``resolve`` on announcements already read: pure, so the gRPC protocol resolves names by the same rules."""
    variants = sorted({str(w.get("model", "")) for w in workers} - {""})
    if model == ALIAS:
        serving = workers
        name = variants[0] if variants else ALIAS
    elif model in variants:
        serving = [w for w in workers if w.get("model") == model]
        name = model
    else:
        known = ", ".join([ALIAS, *variants])
        raise ModelNotFound(f"unknown model {model!r}; this server serves {known}")
    versions = tuple(sorted({_version(w) for w in serving} - {""}))
    if version is not None and version not in versions:
        served = ", ".join(versions) or "none while no worker is warm"
        raise ModelNotFound(f"model {model!r} has no version {version!r}; versions served: {served}")
    return Served(name, versions)


# -------------------------------------------------------------------------------------------- metadata


def _server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0"


# One input and three outputs. The protocol allows one datatype per input, so the input is listed as UINT8 (pictures,
# the common case) and ``properties`` says FP32 is accepted too, with the layouts and the rules; listing FP32 as a
# second input would tell clients to send two tensors.
INPUTS_METADATA = [{"name": INPUT, "datatype": "UINT8", "shape": [-1, -1, -1]}]
OUTPUTS_METADATA = [
    {"name": "mask", "datatype": "UINT8", "shape": [-1, -1, -1]},
    {"name": "score", "datatype": "FP32", "shape": [-1]},
    {"name": "report", "datatype": "BYTES", "shape": [1]},
]
PROPERTIES = {
    "input.image.datatypes": "UINT8,FP32",
    "input.image.layouts": ",".join(tensor.LAYOUTS),
    "input.image.default_layout": "rank 2: HW; rank 3: HWC if the last axis is 1 or 3, else CHW if the first is,"
    " else NHW; rank 4: NHWC if the last axis is 1 or 3, else NCHW",
    "input.image.values": "UINT8: grey or RGB 0..255; FP32 grey: intensities (Hounsfield units with modality=CT);"
    " FP32 RGB: values in [0, 1]",
    "parameters": "layout (HW, HWC, CHW, NHW, NHWC, NCHW), modality (CT, MR, US, ...), timeout (microseconds)",
    "output.mask": "0/1 per pixel, [slices, rows, columns] on the input grid",
    "output.score": "reliability score of each slice, in [0, 1]",
    "output.report": "the full result JSON (schema of /v1/segmentations results)",
}


@router.get("/v2", summary="Server metadata")
async def server_metadata(principal: Caller) -> Response:
    return JSONResponse({"name": SERVER_NAME, "version": _server_version(), "extensions": []})


@router.get("/v2/models/{model}", summary="Model metadata")
async def model_metadata(request: Request, model: str, principal: Caller) -> Response:
    return await _metadata(request, model, None)


@router.get("/v2/models/{model}/versions/{version}", summary="Model metadata, one version")
async def model_version_metadata(request: Request, model: str, version: str, principal: Caller) -> Response:
    return await _metadata(request, model, version)


async def _metadata(request: Request, model: str, version: str | None) -> Response:
    served = await resolve(request, model, version)
    settings: Settings = request.app.state.settings
    return JSONResponse(
        {
            "name": served.name,
            "versions": list(served.versions),
            "platform": "c2p-pipeline",
            "inputs": INPUTS_METADATA,
            "outputs": OUTPUTS_METADATA,
            "properties": {**PROPERTIES, "engine": settings.engine.kind},
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
    served = await resolve(request, model, version)
    if not served.versions:
        raise Unavailable(f"model {model!r} is not ready: no worker has warmed it up yet")
    return JSONResponse({"name": served.name, "ready": True})


# ----------------------------------------------------------------------------------------------- request


@dataclass
class _Inference:
    """A parsed, validated request: the tensor as an upload plus how to answer."""

    upload: tuple[str, bytes]
    layout: str
    modality: str | None
    outputs: list[tuple[str, bool]]  # (name, binary) in answer order
    request_id: str | None
    timeout_s: float | None


async def _read_body(request: Request, limits: LimitSettings) -> bytearray:
    """The whole body, never more than the upload limit (declared or streamed), inflated when compressed."""
    limit = limits.max_upload_bytes
    declared_length(request, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in _WBITS:
        raise InvalidRequest(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    return await run_in_threadpool(_inflate, body, _WBITS[encoding], limit)


def _inflate(data: bytearray, wbits: int, limit: int) -> bytearray:
    """Inflate at most ``limit`` bytes: a small compressed body must not become a large one in memory."""
    engine = zlib.decompressobj(wbits)
    try:
        out = bytearray(engine.decompress(data, limit + 1))
        while engine.unconsumed_tail and len(out) <= limit:
            out += engine.decompress(engine.unconsumed_tail, limit + 1 - len(out))
    except zlib.error as exc:
        raise InvalidRequest("the compressed request body is corrupt") from exc
    if len(out) > limit:
        raise PayloadTooLarge(f"the request body inflates past the limit of {limit} bytes")
    if not engine.eof:
        raise InvalidRequest("the compressed request body is truncated")
    return out


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return value


def _text_parameter(params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"parameter {key!r} must be a string")
    return value


def _modality(value: str | None) -> str | None:
    from service.gateway.app import MODALITIES  # app.py includes this router: imported late to avoid a cycle

    hint = normalise_hint(value)
    if hint is not None and hint not in MODALITIES:
        raise InvalidRequest(f"unknown modality {value!r}; expected one of {', '.join(MODALITIES)}")
    return hint


def _timeout_s(params: dict[str, Any]) -> float | None:
    value = params.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:  # NaN too
        raise InvalidRequest("parameter 'timeout' must be a non-negative number of microseconds")
    return value / 1e6 if value > 0 else None


def _outputs(body: dict[str, Any], binary_default: bool) -> list[tuple[str, bool]]:
    requested = body.get("outputs")
    if not requested:
        return [(name, binary_default) for name in OUTPUTS]
    if not isinstance(requested, list):
        raise InvalidRequest("'outputs' must be a list")
    chosen: list[tuple[str, bool]] = []
    for item in requested:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidRequest("each requested output needs a 'name'")
        name = item["name"]
        if name not in OUTPUTS:
            raise InvalidRequest(f"unknown output {name!r}; outputs are {', '.join(OUTPUTS)}")
        if any(name == seen for seen, _ in chosen):
            raise InvalidRequest(f"output {name!r} is requested twice")
        params = _object(item.get("parameters"), f"output {name!r} parameters")
        if params.get("classification") or "shared_memory_region" in params:
            raise InvalidRequest(f"output {name!r}: classification and shared memory are not supported")
        chosen.append((name, bool(params.get("binary_data", binary_default))))
    return chosen


def _shape(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidTensor(f"input {INPUT!r}: 'shape' must be a list of integers, got {str(value)[:80]}")
    return value


def _from_json(data: Any, shape: list[int], datatype: str) -> np.ndarray:
    """JSON ``data``, flat or nested as the shape, checked for count, kind and range before it becomes a tensor."""
    what = f"input {INPUT!r}"
    if not isinstance(data, list):
        raise InvalidTensor(f"{what}: 'data' must be a list of numbers")
    try:
        values = np.array(data)
    except ValueError as exc:  # ragged nesting
        raise InvalidTensor(f"{what}: 'data' is not a regular array (nested lists of different lengths)") from exc
    expected = math.prod(shape)
    if values.ndim > 1 and list(values.shape) != shape:
        raise InvalidTensor(f"{what}: nested 'data' has shape {list(values.shape)}, 'shape' says {shape}")
    if values.size != expected:
        raise InvalidTensor(f"{what}: 'data' holds {values.size} values, shape {shape} needs {expected}")
    if datatype == "UINT8":
        if values.dtype.kind not in "iu":
            raise InvalidTensor(f"{what}: UINT8 'data' must be integers")
        if values.size and (int(values.min()) < 0 or int(values.max()) > 255):
            raise InvalidTensor(f"{what}: UINT8 values must lie in 0..255")
    elif values.dtype.kind not in "iuf":
        raise InvalidTensor(f"{what}: FP32 'data' must be numbers")
    with np.errstate(over="ignore"):  # a double beyond float32 becomes inf, refused below as non-finite
        return values.astype(DATATYPES[datatype]).reshape(shape)


def parse_inference(raw: bytearray, header_length: str | None, settings: Settings) -> _Inference:
    """The request body (JSON header, then binary inputs when ``Inference-Header-Content-Length`` says so) as a
    validated tensor upload. Shape and limits are checked before any data is read; CPU-bound, so run in a thread."""
    limits = settings.limits
    if header_length is None:
        json_end = len(raw)
    else:
        try:
            json_end = int(header_length)
        except ValueError as exc:
            raise InvalidRequest(f"{HEADER_LENGTH} is not a number") from exc
        if not 0 < json_end <= len(raw):
            raise InvalidRequest(f"{HEADER_LENGTH} {json_end} does not fit a body of {len(raw)} bytes")
    if json_end > JSON_MAX_BYTES:
        raise PayloadTooLarge(
            f"the JSON part has {json_end} bytes, the limit is {JSON_MAX_BYTES}; send large tensors as binary data"
        )
    try:
        body = json.loads(bytes(raw[:json_end]))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InvalidRequest(f"the inference request is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the inference request must be a JSON object")
    binary = memoryview(raw)[json_end:]
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest("'id' must be a string")
    params = _object(body.get("parameters"), "'parameters'")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidRequest(f"send exactly one input, {INPUT!r}")
    item = inputs[0]
    if item.get("name") != INPUT:
        raise InvalidTensor(f"unknown input {str(item.get('name'))[:40]!r}; the model's one input is {INPUT!r}")
    what = f"input {INPUT!r}"
    datatype = item.get("datatype")
    if datatype not in DATATYPES:
        raise InvalidTensor(f"{what}: datatype {str(datatype)[:20]!r} is not accepted; send UINT8 or FP32")
    shape = _shape(item.get("shape"))
    input_params = _object(item.get("parameters"), f"{what} parameters")
    if "shared_memory_region" in input_params:
        raise InvalidRequest(f"{what}: shared memory is not supported; send the data in the request")
    layout = _text_parameter(input_params, "layout") or _text_parameter(params, "layout")
    layout, (z, y, x), channels = tensor.check_shape(shape, layout.upper() if layout else None, limits, what)
    outputs = _outputs(body, bool(params.get("binary_data_output", False)))
    if ("mask", False) in outputs and z * y * x > JSON_MAX_VALUES:
        raise InvalidRequest(f"a mask of {z * y * x} values is too large for JSON; ask for it as binary data")
    modality = _modality(_text_parameter(input_params, "modality") or _text_parameter(params, "modality"))

    dtype = DATATYPES[datatype]
    expected = math.prod(shape) * dtype.itemsize
    size = input_params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidRequest(f"{what}: 'binary_data_size' must be a non-negative integer")
        if "data" in item:
            raise InvalidRequest(f"{what}: both 'data' and 'binary_data_size'; send one")
        if size != len(binary):
            raise InvalidTensor(
                f"{what}: 'binary_data_size' is {size} bytes but {len(binary)} bytes follow the JSON header"
            )
        if size != expected:
            raise InvalidTensor(f"{what}: {size} bytes of binary data, shape {shape} of {datatype} needs {expected}")
        array = np.frombuffer(binary, dtype=dtype).reshape(shape)
    else:
        if len(binary):
            raise InvalidRequest(f"{len(binary)} bytes follow the JSON header but no input has 'binary_data_size'")
        if "data" not in item:
            raise InvalidTensor(f"{what}: no 'data' and no 'binary_data_size'")
        array = _from_json(item["data"], shape, datatype)
    tensor.check_values(array, channels, what)
    return _Inference(
        upload=tensor.encode(array, layout),
        layout=layout,
        modality=modality,
        outputs=outputs,
        request_id=request_id,
        timeout_s=_timeout_s(params),
    )


# ---------------------------------------------------------------------------------------------- response


def _outputs_of(result: SegmentationResult) -> dict[str, tuple[str, list[int], np.ndarray | bytes]]:
    """name -> (datatype, shape, value): the masks decoded from the result's RLE, one score per slice, the JSON."""
    height, width = result.mask.size
    slices = sorted(result.mask.slices, key=lambda s: s.index)
    mask = np.zeros((len(slices), height, width), dtype=np.uint8)
    for k, piece in enumerate(slices):
        mask[k] = rle.decode({"size": [height, width], "counts": piece.counts})
    scores = sorted(result.reliability.slices, key=lambda s: s.index)
    score = np.array([s.score for s in scores], dtype=np.float32)
    report = result.model_dump_json().encode()
    return {
        "mask": ("UINT8", list(mask.shape), mask),
        "score": ("FP32", [len(score)], score),
        "report": ("BYTES", [1], report),
    }


def result_parameters(result: SegmentationResult) -> dict[str, str]:
    """What the answer says beyond the tensors, as OIP string parameters (REST and gRPC alike)."""
    concept = result.concept
    return {
        "concept": concept.name,
        "concept_code": f"{concept.code.scheme}:{concept.code.value}",
        "concept_meaning": concept.code.meaning,
        "intended_use": result.intended_use,
    }


def build_response(job: Job, inference: _Inference) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length (the extension's header)."""
    result = job.result
    assert result is not None
    values = _outputs_of(result)
    outputs = []
    blobs: list[bytes] = []
    for name, binary in inference.outputs:
        datatype, shape, value = values[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            blob = struct.pack("<I", len(value)) + value if isinstance(value, bytes) else value.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif isinstance(value, bytes):
            entry["data"] = [value.decode()]
        else:
            entry["data"] = value.ravel().tolist()
        outputs.append(entry)
    answer: dict[str, Any] = {
        "model_name": result.model.name,
        "model_version": result.model.digest[:VERSION_DIGITS],
        "parameters": {
            "job_id": job.id,
            "reliability_score": result.reliability.score,
            "reliability_level": result.reliability.level,
            **result_parameters(result),
        },
        "outputs": outputs,
    }
    if inference.request_id is not None:
        answer["id"] = inference.request_id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


# ------------------------------------------------------------------------------------------------- infer


async def _client_gone(request: Request) -> None:
    """Returns when the client hangs up (the body is read by then, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel until it is done: redis-py (8.1) swallows a cancellation that lands inside a command now and then, and
    a single cancel() would then leave the wait running to its end."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        task.exception()  # retrieved: an error after the decision to stop is of no interest


async def _wait(request: Request, queue: JobQueue, job_id: str, timeout_s: float) -> Job:
    """The finished job; a job still queued or running when the wait ends (time, hang-up, shutdown) is deleted."""
    waiter = asyncio.ensure_future(queue.wait(job_id, timeout_s))
    watcher = asyncio.ensure_future(_client_gone(request))
    job: Job | None = None
    try:
        done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            raise Cancelled("the client closed the request; its job was deleted")
        job = waiter.result()
        return job
    finally:
        await asyncio.shield(_finish(queue, job_id, job, waiter, watcher))


async def _finish(queue: JobQueue, job_id: str, job: Job | None, *tasks: asyncio.Future[Any]) -> None:
    """Shielded: a cancelled request (server shutdown) still stops its helpers and drops its job."""
    for task in tasks:
        await _stop(task)
    if job is None or job.status not in TERMINAL:
        with contextlib.suppress(ServiceError, RedisError, OSError):
            await queue.delete(job_id)


INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "An inference request: JSON, or JSON then binary tensor data (Inference-Header-Content-Length"
        " gives the JSON's length; gzip or deflate Content-Encoding accepted)",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "layout": {"type": "string", "description": ", ".join(tensor.LAYOUTS)},
                                "modality": {"type": "string"},
                                "timeout": {"type": "number", "minimum": 0, "description": "microseconds"},
                                "binary_data_output": {"type": "boolean"},
                            },
                        },
                        "inputs": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "datatype", "shape"],
                                "properties": {
                                    "name": {"type": "string", "enum": [INPUT]},
                                    "datatype": {"type": "string", "enum": list(DATATYPES)},
                                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                                    "data": {"type": "array", "description": "flat, or nested as the shape"},
                                    "parameters": {
                                        "type": "object",
                                        "properties": {
                                            "binary_data_size": {"type": "integer", "minimum": 0},
                                            "layout": {"type": "string"},
                                            "modality": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": list(OUTPUTS)},
                                    "parameters": {
                                        "type": "object",
                                        "properties": {"binary_data": {"type": "boolean"}},
                                    },
                                },
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "length of the JSON part when binary tensor data follows it",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
    "responses": {
        "200": {
            "description": "the outputs: JSON, or JSON then binary output data when any output is binary",
            "headers": {
                HEADER_LENGTH: {
                    "description": "length of the JSON part when binary output data follows it",
                    "schema": {"type": "integer", "minimum": 0},
                }
            },
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["model_name", "model_version", "outputs"],
                        "properties": {
                            "id": {"type": "string"},
                            "model_name": {"type": "string"},
                            "model_version": {"type": "string"},
                            "parameters": {"type": "object"},
                            "outputs": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["name", "datatype", "shape"],
                                    "properties": {
                                        "name": {"type": "string", "enum": list(OUTPUTS)},
                                        "datatype": {"type": "string"},
                                        "shape": {"type": "array", "items": {"type": "integer"}},
                                        "data": {"type": "array"},
                                        "parameters": {"type": "object"},
                                    },
                                },
                            },
                        },
                    }
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}


@router.post("/v2/models/{model}/infer", summary="Inference", openapi_extra=INFER_BODY)
async def infer(request: Request, model: str, principal: Caller) -> Response:
    return await _infer(request, principal, model, None)


@router.post("/v2/models/{model}/versions/{version}/infer", summary="Inference, one version", openapi_extra=INFER_BODY)
async def infer_version(request: Request, model: str, version: str, principal: Caller) -> Response:
    return await _infer(request, principal, model, version)


async def _infer(request: Request, principal: Principal, model: str, version: str | None) -> Response:
    started = time.perf_counter()
    settings: Settings = request.app.state.settings
    if model != ALIAS or version is not None:
        await resolve(request, model, version, fresh=False)
    raw = await _read_body(request, settings.limits)
    inference = await run_in_threadpool(parse_inference, raw, request.headers.get(HEADER_LENGTH), settings)
    del raw
    queue = JobQueue(request.app.state.redis, settings.queue)
    submitted = await submit_upload(
        queue,
        [inference.upload],
        settings.limits,
        inference.modality,
        tenant=principal.tenant,
        trace_parent=request.headers,
        layout=inference.layout,
    )
    await request.app.state.access.record("infer", principal, API, submitted.id)
    inference.upload = ("", b"")  # the queue holds it now; do not keep a second copy for the whole wait
    wait_s = settings.queue.max_wait_s
    if inference.timeout_s is not None:
        wait_s = min(wait_s, inference.timeout_s)
    job = await _wait(request, queue, submitted.id, wait_s)
    if job.status == "failed" and job.error is not None:
        return v2_error(request, from_code(job.error.code, job.error.message))
    if job.status != "succeeded" or job.result is None:
        raise DeadlineExceeded(f"no result within {wait_s:g} s; the job was deleted")
    body, header_length = await run_in_threadpool(build_response, job, inference)
    request.app.state.metrics.succeeded(API, started)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})
