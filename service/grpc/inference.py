"""The Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``, for tritonclient.grpc.

The REST protocol's rules (service/gateway/kserve.py) over the other transport, so the two answer alike: the same
model names (the variant warm workers announce, and the alias ``c2p``), the same one input ``image`` (UINT8 or FP32,
in a layout ``service.inputs.tensor`` reads, N becoming slices), the same checks in the same words, the same outputs
``mask`` UINT8 [slices, rows, columns], ``score`` FP32 [slices] and ``report`` BYTES [1] (the result JSON). The
tensor arrives in ``raw_input_contents`` (what tritonclient sends) or in ``contents`` (``uint_contents`` for UINT8,
``fp32_contents`` for FP32), and becomes an ``.npy`` upload on the same probe, queue, worker and batcher as every
other request: nothing here runs the model. Outputs go back in ``raw_output_contents``, as Triton sends them (BYTES
as 4-byte little-endian length + bytes).

Parameters, on the request or on the input: ``layout``, ``modality`` (strings) and ``timeout`` (request, int64
microseconds, Triton's unit). The wait ends at the first of ``queue.max_wait_s``, ``timeout`` and the call's deadline
(a little before it, so the answer still arrives): a job not done by then is deleted whatever its state, as REST does,
because the protocol has no call that could collect it later, and the call ends DEADLINE_EXCEEDED. A cancelled call
deletes its job the same way.

Errors map through the shared error table: bad tensors INVALID_ARGUMENT, unknown model or version NOT_FOUND (ModelReady
answers false, as Triton does), queue full RESOURCE_EXHAUSTED (with ``retry-after``), Redis away UNAVAILABLE; the
service's code rides in trailing metadata ``c2p-error-code`` as on c2p.v1. Metrics count under the API label
``kserve-grpc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import redis.asyncio as aioredis

from service.access import Access
from service.auth import Authenticator
from service.config import Settings
from service.dataplane.jobs import failure, wait_or_delete
from service.dataplane.models import SERVER_NAME, ModelDirectory, is_ready, server_version
from service.dataplane.oip import (
    DATATYPES,
    INPUT,
    INPUTS_METADATA,
    OUTPUTS,
    OUTPUTS_METADATA,
    answer_of,
    outputs_of,
)
from service.dataplane.submit import modality_hint, submit_upload
from service.errors import (
    InvalidRequest,
    InvalidTensor,
    ModelNotFound,
    PayloadTooLarge,
    ServiceError,
)
from service.grpc import inference_pb2, inference_pb2_grpc
from service.grpc.calls import (
    Registration,
    caller,
    check_response_size,
    error_metadata,
    log_rejected,
    status_code,
    trace_headers,
)
from service.inputs import Upload, tensor
from service.ops.metrics import Metrics
from service.queue import JobQueue
from service.schema import Job

log = logging.getLogger(__name__)

API = "kserve-grpc"
SERVICE = "GRPCInferenceService"
# End a wait this long before the call's deadline, so the job is deleted and the status arrives in time.
DEADLINE_MARGIN_S = 0.1
# The typed ``contents`` field each accepted datatype travels in (the protocol's rule: UINT8 widens to uint32).
CONTENTS = {"UINT8": ("uint_contents", np.uint32), "FP32": ("fp32_contents", np.float32)}


def inference_registration(
    settings: Settings, client: aioredis.Redis, metrics: Metrics, authenticator: Authenticator | None = None
) -> Registration:
    """What ``build_server(..., services=[...])`` needs to serve the protocol beside c2p.v1."""
    service = InferenceService(settings, client, metrics, Access(settings, client, authenticator))
    return Registration(
        inference_pb2.DESCRIPTOR.services_by_name[SERVICE],
        lambda server: inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server),
    )


# ----------------------------------------------------------------------------------------------- request


@dataclass
class Inference:
    """A parsed, validated request: the tensor as an upload plus what the answer needs."""

    upload: Upload
    layout: str
    modality: str | None
    outputs: list[str]
    timeout_s: float | None


def _parameter(params: Any, key: str) -> Any:
    """The value of an InferParameter map entry, whichever oneof member carries it; None when absent."""
    if key not in params:
        return None
    param = params[key]
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)


def _text(params: Any, key: str) -> str | None:
    value = _parameter(params, key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"parameter {key!r} must be a string")
    return value


def _timeout_s(params: Any) -> float | None:
    value = _parameter(params, "timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidRequest("parameter 'timeout' must be a non-negative number of microseconds")
    return value / 1e6 if value > 0 else None


def _outputs(request: Any) -> list[str]:
    if not request.outputs:
        return list(OUTPUTS)
    chosen: list[str] = []
    for item in request.outputs:
        if item.name not in OUTPUTS:
            raise InvalidRequest(f"unknown output {item.name[:40]!r}; outputs are {', '.join(OUTPUTS)}")
        if item.name in chosen:
            raise InvalidRequest(f"output {item.name!r} is requested twice")
        if _parameter(item.parameters, "classification") or "shared_memory_region" in item.parameters:
            raise InvalidRequest(f"output {item.name!r}: classification and shared memory are not supported")
        chosen.append(item.name)
    return chosen


def _filled(contents: Any) -> list[str]:
    return [f.name for f, _ in contents.ListFields()]


def _from_contents(item: Any, shape: list[int], datatype: str, what: str) -> np.ndarray:
    """Typed ``contents``: the datatype's own field, the right count, UINT8 values in range."""
    name, wide = CONTENTS[datatype]
    others = [f for f in _filled(item.contents) if f != name]
    if others:
        raise InvalidTensor(f"{what}: {datatype} data travels in contents.{name}, not in {', '.join(others)}")
    values = getattr(item.contents, name)
    expected = math.prod(shape)
    if len(values) != expected:
        raise InvalidTensor(f"{what}: contents.{name} holds {len(values)} values, shape {shape} needs {expected}")
    array = np.fromiter(values, dtype=wide, count=len(values))
    if datatype == "UINT8" and array.size and int(array.max()) > 255:
        raise InvalidTensor(f"{what}: UINT8 values must lie in 0..255")
    return array.astype(DATATYPES[datatype]).reshape(shape)


def parse_request(request: Any, settings: Settings) -> Inference:
    """The request as a validated tensor upload, refused in REST's words; shape and limits before any data.

    CPU-bound (a copy of the tensor, a scan of its values, the ``.npy`` encoding): run it in a thread.
    """
    limits = settings.limits
    if len(request.inputs) != 1:
        raise InvalidRequest(f"send exactly one input, {INPUT!r}")
    item = request.inputs[0]
    if item.name != INPUT:
        raise InvalidTensor(f"unknown input {item.name[:40]!r}; the model's one input is {INPUT!r}")
    what = f"input {INPUT!r}"
    if item.datatype not in DATATYPES:
        raise InvalidTensor(f"{what}: datatype {item.datatype[:20]!r} is not accepted; send UINT8 or FP32")
    datatype = item.datatype
    shape = [int(d) for d in item.shape]
    if "shared_memory_region" in item.parameters:
        raise InvalidRequest(f"{what}: shared memory is not supported; send the data in the request")
    layout = _text(item.parameters, "layout") or _text(request.parameters, "layout")
    layout, _, channels = tensor.check_shape(shape, layout.upper() if layout else None, limits, what)
    modality = modality_hint(_text(item.parameters, "modality") or _text(request.parameters, "modality"))
    outputs = _outputs(request)

    dtype = DATATYPES[datatype]
    expected = math.prod(shape) * dtype.itemsize
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidRequest(f"{len(request.raw_input_contents)} raw_input_contents for one input; send one")
        if _filled(item.contents):
            raise InvalidRequest(f"{what}: both raw_input_contents and contents; send one")
        raw = request.raw_input_contents[0]
        if len(raw) > limits.max_upload_bytes:
            raise PayloadTooLarge(f"{what}: {len(raw)} bytes exceed the limit of {limits.max_upload_bytes} bytes")
        if len(raw) != expected:
            raise InvalidTensor(
                f"{what}: {len(raw)} bytes in raw_input_contents, shape {shape} of {datatype} needs {expected}"
            )
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    elif _filled(item.contents):
        array = _from_contents(item, shape, datatype, what)
    else:
        raise InvalidTensor(f"{what}: no data; send raw_input_contents or contents.{CONTENTS[datatype][0]}")
    tensor.check_values(array, channels, what)
    return Inference(
        upload=tensor.encode(array, layout),
        layout=layout,
        modality=modality,
        outputs=outputs,
        timeout_s=_timeout_s(request.parameters),
    )


# ---------------------------------------------------------------------------------------------- response


def _raw(value: np.ndarray | bytes) -> bytes:
    """Triton's raw layout: tensors as little-endian bytes, a BYTES element as its uint32 length then itself."""
    return struct.pack("<I", len(value)) + value if isinstance(value, bytes) else value.tobytes()


def build_response(job: Job, inference: Inference, request_id: str) -> Any:
    assert job.result is not None
    values = outputs_of(job.result)
    name, version, parameters = answer_of(job)
    response = inference_pb2.ModelInferResponse(model_name=name, model_version=version, id=request_id)
    for key, value in parameters.items():
        if isinstance(value, float):
            response.parameters[key].double_param = value
        else:
            response.parameters[key].string_param = value
    for name in inference.outputs:
        datatype, shape, value = values[name]
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(_raw(value))
    return response


# ---------------------------------------------------------------------------------------------- servicer


@dataclass
class _Call:
    """What an error needs from the call it ends: the job, once there is one (a client can quote it)."""

    job_id: str | None = None


class InferenceService(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, settings: Settings, client: aioredis.Redis, metrics: Metrics, access: Access) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self.access = access
        self.queue = JobQueue(client, settings.queue)
        self.models = ModelDirectory.for_settings(client, settings)

    # -- RPCs ------------------------------------------------------------------------------------------

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """Depends on nothing, as REST's /v2/health/live: a live process that cannot reach Redis is not dead."""
        return inference_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """REST readiness: Redis answers and a warm worker has announced itself."""
        return inference_pb2.ServerReadyResponse(
            ready=await is_ready(self.queue, self.client, self.settings.queue.prefix)
        )

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async with self._errors(context):
            await caller(context, self.access, API)
            return inference_pb2.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=[])

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """A flag, never NOT_FOUND: Triton answers unknown names and versions ``ready: false``, so clients branch on it
        (``is_model_ready`` would raise otherwise, unlike the HTTP client's). Redis away is still UNAVAILABLE."""
        async with self._errors(context):
            try:
                served = await self.models.resolve(request.name, request.version or None)
            except ModelNotFound:
                return inference_pb2.ModelReadyResponse(ready=False)
            return inference_pb2.ModelReadyResponse(ready=served.target is not None and served.target.live)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async with self._errors(context):
            await caller(context, self.access, API)
            served = await self.models.resolve(request.name, request.version or None)
            tensors = inference_pb2.ModelMetadataResponse.TensorMetadata
            return inference_pb2.ModelMetadataResponse(
                name=served.name,
                versions=list(served.versions),
                platform="c2p-pipeline",
                inputs=[tensors(**entry) for entry in INPUTS_METADATA],
                outputs=[tensors(**entry) for entry in OUTPUTS_METADATA],
            )

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        started = time.perf_counter()
        async with self._errors(context) as call:
            principal = await caller(context, self.access, API)
            version = request.model_version or None
            await self.models.route(request.model_name, version)  # unknown: NOT_FOUND before the tensor is parsed
            inference = await asyncio.to_thread(parse_request, request, self.settings)
            submitted = await submit_upload(
                self.queue,
                self.models,
                [inference.upload],
                self.settings.limits,
                inference.modality,
                tenant=principal.tenant,
                model=request.model_name,
                version=version,
                trace_parent=trace_headers(context),
                dedupe=False,  # the call deletes its job when it stops waiting, so no other call may share it
                layout=inference.layout,
            )
            await self.access.record("infer", principal, API, submitted.id)
            inference.upload = ("", b"")  # the queue holds it now: no second copy for the whole wait
            call.job_id = submitted.id
            job = await wait_or_delete(self.queue, submitted.id, self._wait_s(inference.timeout_s, context))
            if (err := failure(job)) is not None:
                raise err
            response = await asyncio.to_thread(build_response, job, inference, request.id)
            check_response_size(
                response.ByteSize(), self.settings.grpc.max_send_message_bytes, "; or ask for the score and report only"
            )
            self.metrics.succeeded(API, started)
            return response

    # -- helpers ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _errors(self, context: grpc.aio.ServicerContext) -> AsyncIterator[_Call]:
        """server.service_errors, counted under this API's label and quoting the job once there is one."""
        call = _Call()
        try:
            yield call
        except grpc.aio.AbortError:
            raise
        except ServiceError as err:
            await self._abort(context, err, call.job_id)
        except Exception:
            log.exception("unhandled error in an Open Inference Protocol gRPC handler")
            await self._abort(context, ServiceError("internal error"), call.job_id)

    async def _abort(self, context: grpc.aio.ServicerContext, err: ServiceError, job_id: str | None) -> None:
        self.metrics.request_failure.labels(API, err.code).inc()
        log_rejected(err, API)
        await context.abort(status_code(err), err.message, trailing_metadata=error_metadata(err, job_id))

    def _wait_s(self, timeout_s: float | None, context: grpc.aio.ServicerContext) -> float:
        """The first of ``queue.max_wait_s``, the request's ``timeout`` and (a margin before) the call's deadline."""
        wait_s = self.settings.queue.max_wait_s
        if timeout_s is not None:
            wait_s = min(wait_s, timeout_s)
        remaining = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, remaining - DEADLINE_MARGIN_S)
        return wait_s


__all__ = ["API", "InferenceService", "build_response", "inference_registration", "parse_request"]
