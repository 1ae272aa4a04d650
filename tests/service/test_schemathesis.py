"""The REST API against its own OpenAPI schema: schemathesis generates requests for every documented operation.

The gateway runs under uvicorn with a real worker, the small exported test model and real Redis, on an event loop in
a thread of its own, while schemathesis sends requests from the test's thread over a loopback socket.

Generated data alone rarely gets past the first check of an operation (a random string is no model name, random bytes
no image), so a hook mixes known-good seeds into the positive cases: real files for the upload and STOW-RS, valid
tensors for inference, the served model's name and version, ids of jobs that exist. Everything else is schemathesis's
own, positive and negative. Checks: no 5xx (``not_a_server_error``), every status, content type, header and JSON body
as documented (``status_code_conformance``, ``content_type_conformance``, ``response_headers_conformance``,
``response_schema_conformance``), other methods answer 405 (``unsupported_method``), schema-violating requests a 4xx
(``negative_data_rejection``, on the cases the hook left alone), and every 4xx body coded. ``positive_data_acceptance``
is left out: a schema cannot say "a decodable image", so schema-valid random bytes are rightly refused.

Reproducible: hypothesis is derandomized, and the example budget per operation keeps the run short.

Driven without schemathesis's pytest plugin (which reaches into pytest's private node ids and breaks on pytest 9.2):
``schemathesis_run.fuzz`` runs hypothesis over ``operation.as_strategy`` for every generation mode the config enables,
one pytest test per operation, the operations read from the app's OpenAPI at collection (no server needed). A tally
of the cases sent shows positive and negative cases and seeds all went out, and a planted 500 in a tiny app shows
the same driver fails, naming the operation, the check and the case.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import hypothesis.strategies as st
import nibabel as nib
import numpy as np
import pytest
import redis
import requests
import schemathesis
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck
from pydicom import dcmread
from pydicom.data import get_testdata_file
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from service.config import QueueSettings, Settings
from service.gateway.app import create_app
from service.gateway.dicomweb import MEDIA_DICOM, MEDIA_DICOM_JSON
from tests.conftest import TEST_VARIANT
from tests.service.harness import disc_image, engine_for, free_port, make_settings, png_bytes, serving_http
from tests.service.schemathesis_run import OperationFailed, fuzz

pytestmark = pytest.mark.slow

MAX_EXAMPLES = 12
BOUNDARY = "c2p-schemathesis-boundary"
STOW_CONTENT_TYPE = f'multipart/related; type="{MEDIA_DICOM}"; boundary={BOUNDARY}'
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    unsupported_method,
]
SETTINGS = {
    "max_examples": MAX_EXAMPLES,
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
}
# Cases the hook seeded: schemathesis re-derives a changed case's mode from its parts, and raw file bytes in a
# format: binary field read as schema-violating, so negative_data_rejection would call a seeded upload negative.
SEEDED: set[str] = set()
# What test_api sent: cases by (operation, the generation mode that drew them), and the seeded ones by operation.
SENT: Counter[tuple[str, str]] = Counter()
SEEDED_SENT: Counter[str] = Counter()
# The operations, from the app's own OpenAPI (building the app needs no Redis, model or server).
LABELS = [
    result.ok().label
    for result in schemathesis.openapi.from_dict(create_app(Settings()).openapi()).get_all_operations()
]


def _nifti() -> bytes:
    data = np.zeros((24, 20, 2), dtype=np.int16)
    data[6:18, 5:15, :] = 300
    image = nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0]))
    buffer = io.BytesIO()
    image.to_file_map(image.make_file_map({"image": buffer, "header": buffer}))
    return gzip.compress(buffer.getvalue())


CT = Path(get_testdata_file("CT_small.dcm")).read_bytes()
MR = Path(get_testdata_file("MR_small.dcm")).read_bytes()
CT_STUDY = str(dcmread(io.BytesIO(CT), stop_before_pixels=True).StudyInstanceUID)
PNG = png_bytes(disc_image((48, 64), 14))
FILES = {"disc.png": PNG, "ct.dcm": CT, "mr.dcm": MR, "vol.nii.gz": _nifti(), "cut.dcm": CT[: len(CT) // 3]}


def _tensor_request(dtype: str, shape: list[int], **extra: Any) -> dict[str, Any]:
    values = disc_image((shape[-2], shape[-1]) if len(shape) == 2 else (shape[1], shape[2]), 8)
    if len(shape) == 4:  # NHWC
        values = np.repeat(values[None, :, :, None], 3, axis=-1)
    data = values.astype(np.float32) * 4 - 200 if dtype == "FP32" else values
    return {"inputs": [{"name": "image", "datatype": dtype, "shape": shape, "data": data.ravel().tolist()}], **extra}


INFER_JSON = [
    _tensor_request("UINT8", [24, 32]),
    _tensor_request(
        "UINT8", [1, 16, 16, 3], id="rgb", outputs=[{"name": "mask", "parameters": {"binary_data": False}}]
    ),
    _tensor_request("FP32", [20, 20], parameters={"modality": "CT", "binary_data_output": True}),
    _tensor_request(
        "UINT8", [24, 32], outputs=[{"name": "score"}, {"name": "report", "parameters": {"binary_data": True}}]
    ),
]


def _binary_infer() -> tuple[bytes, str]:
    """The binary tensor data extension: the JSON header, then the raw tensor."""
    raw = disc_image((24, 32), 8).tobytes()
    item = {"name": "image", "datatype": "UINT8", "shape": [24, 32], "parameters": {"binary_data_size": len(raw)}}
    header = json.dumps({"inputs": [item]}).encode()
    return header + raw, str(len(header))


# ------------------------------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def served(redis_url: str, exported: Path) -> Iterator[dict[str, Any]]:
    """A gateway + worker serving in a background thread: its base URL, model version and a few finished jobs."""
    prefix = f"tst{uuid4().hex[:8]}"
    service_settings = make_settings(redis_url, QueueSettings(prefix=prefix, max_wait_s=10), exported)
    engine = engine_for(exported)
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        stop = asyncio.Event()
        state["loop"], state["stop"] = asyncio.get_running_loop(), stop
        async with serving_http(service_settings, engine) as url:
            state["url"] = url
            started.set()
            await stop.wait()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            state["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run, name="schemathesis-gateway", daemon=True)
    thread.start()
    assert started.wait(60), "the gateway did not start"
    if "error" in state:
        raise state["error"]
    try:
        url = state["url"]
        jobs = {}
        for name in ("disc.png", "ct.dcm", "disc.png"):
            response = requests.post(f"{url}/v1/segmentations?wait=10", files={"file": (name, FILES[name])}, timeout=30)
            assert response.status_code == 200, response.text
            jobs.setdefault(name, []).append(response.json()["id"])
        yield {
            "url": url,
            "version": engine.artifact.digest[:12],
            "jobs": [jobs["disc.png"][0], jobs["ct.dcm"][0]],
            "to_delete": jobs["disc.png"][1],
        }
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(60)
        client = redis.Redis.from_url(redis_url)
        with contextlib.closing(client):
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
        if "error" in state:
            raise state["error"]


# ------------------------------------------------------------------------------------------------- seeds


Seed = Callable[[schemathesis.Case], None]


def _seeds(served: dict[str, Any], label: str) -> list[Seed]:
    """Known-good variations of a positive case for this operation (each replaces some of its parts)."""
    seeds: list[Seed] = []

    def setter(**parts: Any) -> Seed:
        def apply(case: schemathesis.Case) -> None:
            for name, value in parts.items():
                if name == "path_parameters":
                    value = {key: v for key, v in value.items() if f"{{{key}}}" in case.path}
                    value = {**case.path_parameters, **value}
                setattr(case, name, value)

        return apply

    method, path = label.split(" ", 1)
    if "{model}" in path:
        seeds += [
            setter(path_parameters={"model": "c2p", "version": served["version"]}),
            setter(path_parameters={"model": TEST_VARIANT, "version": served["version"]}),
        ]
    if label == "POST /v1/segmentations":
        for names, query in (
            (["disc.png"], {"wait": 5}),
            (["ct.dcm"], {"wait": 5}),
            (["vol.nii.gz"], {"wait": 5, "modality": "MR"}),
            (["cut.dcm"], {}),
            (["disc.png", "ct.dcm"], {}),
            (["disc.png"], {"modality": "us"}),
        ):
            body = {"file": [FILES[name] for name in names]}
            seeds.append(setter(body=body, query=query, media_type="multipart/form-data"))
    if path.startswith("/v1/segmentations/{job_id}"):
        ids = [served["to_delete"]] if method == "DELETE" else served["jobs"]
        seeds += [setter(path_parameters={"job_id": job_id}) for job_id in ids]
        if path.endswith("/result"):
            seeds += [
                setter(path_parameters={"job_id": job_id}, query=query)
                for job_id in served["jobs"]
                for query in ({"format": "nifti"}, {"format": "png", "slice": 0}, {"format": "dicom-seg"})
            ]
    if path.endswith("/infer"):
        model = {"model": "c2p", "version": served["version"]}
        seeds += [setter(path_parameters=model, body=body, media_type="application/json") for body in INFER_JSON]
        body, length = _binary_infer()
        seeds.append(
            setter(
                path_parameters=model,
                body=body,
                media_type="application/octet-stream",
                headers={"Inference-Header-Content-Length": length},
            )
        )
    if path.startswith("/dicomweb/"):
        for parts in ([CT], [CT, MR], [FILES["cut.dcm"]], [CT, b"not dicom"]):
            seeds.append(setter(body=parts, media_type="multipart/related", path_parameters={"study": CT_STUDY}))
    return seeds


@schemathesis.serializer("multipart/related")
def _multipart_related(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """STOW-RS bodies: one application/dicom part per item, with the boundary the test's Content-Type names."""
    items = value if isinstance(value, list) else [value]
    body = io.BytesIO()
    for item in items:
        if isinstance(item, str | bytes) and hasattr(item, "data"):  # schemathesis's Binary
            item = item.data
        data = item if isinstance(item, bytes) else json.dumps(item, default=str).encode()  # negative cases
        body.write(f"--{BOUNDARY}\r\nContent-Type: {MEDIA_DICOM}\r\n\r\n".encode())
        body.write(data + b"\r\n")
    body.write(f"--{BOUNDARY}--\r\n".encode())
    return body.getvalue()


CONFIG = {
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
    "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    "request-timeout": 30,
}


@pytest.fixture(scope="module")
def api_schema(served: dict[str, Any]) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(CONFIG)
    loaded = schemathesis.openapi.from_url(f"{served['url']}/openapi.json", config=config)

    @loaded.hook
    def flatmap_case(context: schemathesis.HookContext, case: schemathesis.Case) -> st.SearchStrategy:
        seeds = _seeds(served, case.operation.label)
        meta = case.meta
        if not seeds or meta is None or meta.generation.mode != schemathesis.GenerationMode.POSITIVE:
            return st.just(case)

        def seeded(seed: Seed | None) -> schemathesis.Case:
            if seed is not None:
                seed(case)
                SEEDED.add(case.id)
            return case

        # Half the positive cases are seeded (test_every_seed_conforms sends each seed once besides).
        return st.one_of(st.just(None), st.sampled_from(seeds)).map(seeded)

    return loaded


def test_the_served_schema_has_the_collected_operations(api_schema: schemathesis.BaseSchema) -> None:
    """test_api is parametrized from the app built at collection; the served schema must list the same operations."""
    assert [result.ok().label for result in api_schema.get_all_operations()] == LABELS


@pytest.mark.parametrize("label", LABELS)
def test_api(api_schema: schemathesis.BaseSchema, label: str) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label

    def send(case: schemathesis.Case) -> None:
        if case.id in SEEDED:
            SEEDED_SENT[label] += 1
        check(case)

    fuzz(operation, send, settings=SETTINGS, headers=extra_headers, sent=SENT)


def test_the_cases_sent_were_positive_negative_and_seeded() -> None:
    """Generation mode "all" and the flatmap_case hook reach the driver: negative cases go to every operation with a
    body, seeds to the upload, inference and STOW-RS."""
    fuzzed = {label for label, _ in SENT}
    if fuzzed != set(LABELS):
        pytest.skip(f"test_api ran for {len(fuzzed)} of {len(LABELS)} operations")
    positive = {label: SENT[label, "positive"] for label in LABELS}
    negative = {label: SENT[label, "negative"] for label in LABELS}
    print(
        f"cases sent: {sum(positive.values())} positive ({sum(SEEDED_SENT.values())} seeded), "
        f"{sum(negative.values())} negative, over {len(LABELS)} operations"
    )
    for label in LABELS:
        print(f"  {label}: {positive[label]} positive ({SEEDED_SENT[label]} seeded), {negative[label]} negative")
    for label in LABELS:
        assert SEEDED_SENT[label] <= positive[label] <= positive[label] + negative[label] <= MAX_EXAMPLES, label
        assert positive[label] > 0, label
        if label.startswith("POST "):
            assert negative[label] > 0, label
    for label in ("POST /v1/segmentations", "POST /v2/models/{model}/infer", "POST /dicomweb/studies/{study}"):
        assert SEEDED_SENT[label] > 0, label


def extra_headers(case: schemathesis.Case) -> dict[str, str] | None:
    """STOW-RS bodies go with the boundary the serializer writes."""
    return {"Content-Type": STOW_CONTENT_TYPE} if case.path.startswith("/dicomweb/") else None


def check(case: schemathesis.Case) -> schemathesis.Response:
    """Send the case and run the checks; every 4xx but STOW-RS's DICOM JSON (a 409 naming the refused instances)
    carries the service's error code and a message."""
    checks = CHECKS if case.id in SEEDED else [*CHECKS, negative_data_rejection]
    response = case.call_and_validate(headers=extra_headers(case), checks=checks)
    media = response.headers.get("content-type", [""])[0]  # schemathesis's headers: lower-case names, list values
    if 400 <= response.status_code < 500 and media != MEDIA_DICOM_JSON:
        assert media == "application/json", (response.status_code, media)
        body = response.json()
        assert isinstance(body, dict) and body.get("code"), response.text
        assert body.get("message") or body.get("error"), response.text
    return response


def test_every_seed_conforms(api_schema: schemathesis.BaseSchema, served: dict[str, Any]) -> None:
    """Each seed once, whatever the generation drew: the known-good requests get documented answers too."""
    statuses: dict[str, list[int]] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for seed in _seeds(served, operation.label):
            case = operation.Case()
            seed(case)
            statuses.setdefault(operation.label, []).append(check(case).status_code)
    # the seeds reach the model: uploads, inference and STOW-RS succeed where their input is good
    for label in ("POST /v1/segmentations", "POST /v2/models/{model}/infer", "POST /dicomweb/studies/{study}"):
        assert 200 in statuses[label], (label, statuses[label])


# ------------------------------------------------------------------------------------------------- the driver fails


@pytest.fixture(scope="module")
def planted() -> Iterator[tuple[FastAPI, str]]:
    """A one-operation app under uvicorn in a thread: with ``app.state.planted`` set it answers 500 for items > 3."""
    app = FastAPI(title="planted", version="1")
    app.state.planted = False

    @app.get("/items/{item}", responses={200: {"description": "the item"}})
    def item(item: int) -> dict[str, int]:
        if app.state.planted and item > 3:
            return JSONResponse({"detail": "planted"}, status_code=500)  # type: ignore[return-value]
        return {"item": item}

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="schemathesis-planted", daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            thread.join(0.05)
        assert server.started, "uvicorn did not start"
        yield app, f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(15)


def _fuzz_planted(url: str, sent: Counter[tuple[str, str]]) -> None:
    loaded = schemathesis.openapi.from_url(f"{url}/openapi.json", config=schemathesis.Config.from_dict(CONFIG))
    (result,) = loaded.get_all_operations()
    checks = [*CHECKS, negative_data_rejection]
    fuzz(result.ok(), lambda case: case.call_and_validate(checks=checks), settings=SETTINGS, sent=sent)


def test_the_planted_app_passes_without_its_bug(planted: tuple[FastAPI, str]) -> None:
    app, url = planted
    app.state.planted = False
    sent: Counter[tuple[str, str]] = Counter()
    _fuzz_planted(url, sent)
    assert sent["GET /items/{item}", "positive"] > 0 and sent["GET /items/{item}", "negative"] > 0, sent


def test_a_planted_server_error_is_reported(planted: tuple[FastAPI, str]) -> None:
    app, url = planted
    app.state.planted = True
    try:
        with pytest.raises(OperationFailed) as raised:
            _fuzz_planted(url, Counter())
    finally:
        app.state.planted = False
    error = raised.value
    assert error.label == "GET /items/{item}"
    (failure,) = error.failures
    assert "not_a_server_error" in failure.checks
    assert failure.case.path_parameters["item"] > 3  # shrunk to a failing case, and that case is reported
    message = str(error)
    assert "GET /items/{item}" in message and "500" in message and "not_a_server_error" in message
    assert f"curl -X GET {url}/items/{failure.case.path_parameters['item']}" in message, message
    response = requests.get(f"{url}/items/{failure.case.path_parameters['item']}", timeout=5)
    assert response.status_code == 200  # the bug is off again: the failure came from the planted 500


# ------------------------------------------------------------------------------------------------- regressions
# Bugs found while writing this test (by targeted requests beside the generated ones): each answered 500.


def test_inference_json_nested_too_deep_is_a_400(served: dict[str, Any]) -> None:
    """json.loads raised RecursionError, which parse_inference did not catch."""
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"inputs": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"):
        response = requests.post(
            f"{served['url']}/v2/models/c2p/infer", data=body, headers={"content-type": "application/json"}, timeout=30
        )
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid_request"


def test_inference_timeout_nan_is_a_400(served: dict[str, Any]) -> None:
    """NaN passed the `< 0` test and was then silently ignored (Python's JSON reads NaN)."""
    body = '{"parameters": {"timeout": NaN}, "inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2],'
    body += ' "data": [1, 2, 3, 4]}]}'
    response = requests.post(
        f"{served['url']}/v2/models/c2p/infer", data=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400, response.text
    assert "timeout" in response.json()["error"]


def test_stow_boundary_longer_than_the_parser_takes_is_a_400(served: dict[str, Any]) -> None:
    """python-multipart refuses boundaries over 256 bytes in its constructor, which ran outside the try."""
    boundary = "b" * 300
    body = f"--{boundary}\r\nContent-Type: {MEDIA_DICOM}\r\n\r\n".encode() + CT + f"\r\n--{boundary}--\r\n".encode()
    response = requests.post(
        f"{served['url']}/dicomweb/studies",
        data=body,
        headers={"content-type": f'multipart/related; type="{MEDIA_DICOM}"; boundary={boundary}'},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_request"


def test_stow_corrupt_instances_are_refused_not_a_500(served: dict[str, Any]) -> None:
    """pydicom raises more than the exceptions identify() caught: NotImplementedError (an unknown VR),
    BytesLengthException and struct.error (cut short). Each instance is now refused on its own (FailureReason
    0xC000, cannot understand), as the gateway's probe does for /v1 uploads."""
    sop_uid = CT.find(b"\x08\x00\x18\x00UI")  # (0008,0018) SOPInstanceUID, explicit VR
    corrupt = [CT[: sop_uid + 4] + b"U+" + CT[sop_uid + 6 :], CT[:141], CT[:152]]
    parts = b"".join(f"--{BOUNDARY}\r\nContent-Type: {MEDIA_DICOM}\r\n\r\n".encode() + p + b"\r\n" for p in corrupt)
    response = requests.post(
        f"{served['url']}/dicomweb/studies",
        data=parts + f"--{BOUNDARY}--\r\n".encode(),
        headers={"content-type": STOW_CONTENT_TYPE},
        timeout=30,
    )
    assert response.status_code == 409, response.text
    failed = response.json()["00081198"]["Value"]
    assert [item["00081197"]["Value"] for item in failed] == [[0xC000]] * len(corrupt)
