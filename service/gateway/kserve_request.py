"""The Open Inference Protocol's REST wire: a request body (JSON, or JSON then binary tensor data, as Triton's
binary tensor data extension sends it) to a validated tensor upload, and a finished job to the response body.

Shape and limits are checked before any data is read; JSON is for small tensors (its part of a request is capped at
64 MiB, and a mask past 16 Mi values is only sent as binary data). Everything here is CPU work on bytes already
read: the routes (kserve.py) run it in a thread.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from service.config import LimitSettings, Settings
from service.dataplane.oip import DATATYPES, INPUT, OUTPUTS, answer_of, check_output, outputs_of
from service.dataplane.submit import modality_hint
from service.errors import InvalidRequest, InvalidTensor, PayloadTooLarge
from service.gateway.kserve_openapi import HEADER_LENGTH
from service.gateway.uploads import declared_length
from service.inputs import tensor
from service.schema import Job

# JSON numbers cost ~30x their bytes once parsed into Python objects, so tensors past these sizes travel as binary
# data (the extension every Triton client uses by default) whatever the upload limit allows.
JSON_MAX_BYTES = 64 * 1024 * 1024
JSON_MAX_VALUES = 16 * 1024 * 1024
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS}


@dataclass
class Inference:
    """A parsed, validated request: the tensor as an upload plus how to answer."""

    upload: tuple[str, bytes]
    layout: str
    modality: str | None
    outputs: list[tuple[str, bool]]  # (name, binary) in answer order
    request_id: str | None
    timeout_s: float | None


async def read_body(request: Request, limits: LimitSettings) -> bytearray:
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
        check_output(name)
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


def parse_inference(raw: bytearray, header_length: str | None, settings: Settings) -> Inference:
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
    modality = modality_hint(_text_parameter(input_params, "modality") or _text_parameter(params, "modality"))

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
    return Inference(
        upload=tensor.encode(array, layout),
        layout=layout,
        modality=modality,
        outputs=outputs,
        request_id=request_id,
        timeout_s=_timeout_s(params),
    )


def build_response(job: Job, inference: Inference) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length (the extension's header)."""
    assert job.result is not None
    values = outputs_of(job.result)
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
    name, version, parameters = answer_of(job)
    answer: dict[str, Any] = {
        "model_name": name,
        "model_version": version,
        "parameters": parameters,
        "outputs": outputs,
    }
    if inference.request_id is not None:
        answer["id"] = inference.request_id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
