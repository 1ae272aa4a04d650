"""DICOMweb STOW-RS: PACS and modalities push studies here as they would to any archive.

``POST /dicomweb/studies`` (and ``/dicomweb/studies/{study}``) takes ``multipart/related; type="application/dicom"``,
groups the instances by series and queues one job per series through the same limits and queue as every other
request. The answer is what a STOW-RS origin server sends (PS3.18 10.5): a DICOM JSON data set with the stored
instances in ReferencedSOPSequence (0008,1199) and the refused ones in FailedSOPSequence (0008,1198) with a
FailureReason (0008,1197); 200 when all were accepted, 202 when some were, 409 when none were. Each stored
instance's RetrieveURL (0008,1190) points at the job of its series (``/v1/segmentations/{id}``), which is where
the segmentation can be fetched, as JSON, DICOM SEG, NIfTI or PNG.

With ``dicomweb.destination_url`` set, each job also asks its worker to send the finished DICOM SEG back to that
DICOMweb server (service.delivery), which is how the result reaches the PACS the study came from.

The body is parsed as it streams (python-multipart) with the upload limits applied to the whole request, each part
spooled to a temporary file past 1 MiB (as the REST upload's parts are: service/gateway/uploads.py), and no part's
preamble or meta header is trusted: each part is read by pydicom as untrusted bytes, headers only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydicom import dcmread
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool

from service.auth import Principal
from service.config import Settings
from service.dataplane.assembly import keep_for_assembly
from service.dataplane.submit import IDEMPOTENCY_HEADER, idempotency_key, submit_upload
from service.errors import InvalidRequest, ServiceError, UnsupportedMediaType
from service.gateway import multipart
from service.gateway.identity import Caller
from service.gateway.multipart import Part
from service.gateway.uploads import declared_length
from service.inputs.dicom.headers import holds_image
from service.inputs.sniff import quiet
from service.inputs.spool import Data, opener, whole
from service.ops.metrics import Metrics
from service.queue import JobQueue
from service.schema import ErrorInfo

log = logging.getLogger(__name__)

API = "stow-rs"
MEDIA_DICOM = "application/dicom"
MEDIA_DICOM_JSON = "application/dicom+json"

# FailureReason values (PS3.4 B.2.3, PS3.18 table 10.5.3-2 and its references)
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

# Which reason a refused series' instances get, by the service's error code.
REASONS = {
    "payload_too_large": OUT_OF_RESOURCES,
    "image_too_large": OUT_OF_RESOURCES,
    "queue_full": OUT_OF_RESOURCES,
    "unsupported_transfer_syntax": TRANSFER_SYNTAX_NOT_SUPPORTED,
    "unsupported_format": SOP_CLASS_NOT_SUPPORTED,
    "invalid_image": CANNOT_UNDERSTAND,
    "invalid_request": CANNOT_UNDERSTAND,
}

UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# WarningReason (0008,1196) of an instance stored but not segmented: "elements discarded" (PS3.4 B.2.3), the nearest
# status PS3.18 has for "kept, and nothing done with it".
NOT_SEGMENTED = 0xB006

# The answers as documented in the OpenAPI schema: DICOM JSON for 200/202/409 (PS3.18 10.5.3), the service's error
# body for a request refused as a whole. The routes build their responses themselves; the router's default response
# class is the bare Response only so that FastAPI does not document a 200 of application/json besides these.
SOP_SEQUENCE = {
    "type": "object",
    "required": ["vr", "Value"],
    "properties": {"vr": {"type": "string", "enum": ["SQ"]}, "Value": {"type": "array", "items": {"type": "object"}}},
}
STOW_RESULT = {
    "content": {
        MEDIA_DICOM_JSON: {
            "schema": {
                "type": "object",
                "properties": {"00081199": SOP_SEQUENCE, "00081198": SOP_SEQUENCE},
                "description": "ReferencedSOPSequence (stored, with RetrieveURL) and FailedSOPSequence (FailureReason)",
            }
        }
    }
}
STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance accepted", **STOW_RESULT},
    202: {"description": "some instances accepted, some refused", **STOW_RESULT},
    409: {"description": "no instance accepted", **STOW_RESULT},
    **{
        status: {"model": ErrorInfo, "description": description}
        for status, description in (
            (400, "malformed request or multipart body"),
            (401, "missing or invalid credentials"),
            (413, "upload over the limits"),
            (415, 'not multipart/related; type="application/dicom"'),
            (503, "Redis unavailable"),
        )
    },
}
STOW_BODY = {
    "requestBody": {
        "required": True,
        "description": "DICOM instances, one part each (Content-Type: application/dicom)",
        "content": {
            "multipart/related": {"schema": {"type": "array", "items": {"type": "string", "format": "binary"}}}
        },
    }
}

router = APIRouter(tags=["DICOMweb"], default_response_class=Response, responses=STOW_RESPONSES)


@dataclass(frozen=True)
class Instance:
    """One part that parsed as DICOM: the identifiers STOW-RS answers with and groups by."""

    index: int
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    data: Data = field(repr=False)


@dataclass(frozen=True)
class Failure:
    sop_class_uid: str | None
    sop_instance_uid: str | None
    reason: int
    message: str  # logged, not sent: DICOM JSON has no place for it and it may quote file content


def public_url(request: Request, path: str) -> str:
    """Where a caller reaches ``path``: under ``C2P_PUBLIC_URL`` behind a proxy, else the scheme, host and port the
    request came to (its Host header), so a RetrieveURL resolves for the PACS that sent the instances."""
    base = request.app.state.settings.public_url or str(request.base_url)
    return base.rstrip("/") + path


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` body; anything else is refused."""
    media, options = parse_options_header(content_type)
    if media != b"multipart/related":
        raise UnsupportedMediaType(f"STOW-RS takes multipart/related; type={MEDIA_DICOM!r}, not {media.decode()!r}")
    kind = options.get(b"type", b"").decode("latin-1").strip('"').lower()
    if kind and kind != MEDIA_DICOM:
        raise UnsupportedMediaType(f"only {MEDIA_DICOM} parts are accepted (type={kind!r}); no metadata+bulk data")
    return multipart.boundary_of(content_type, "multipart/related")


def identify(parts: Sequence[Part], study: str | None) -> tuple[list[Instance], list[Instance], list[Failure]]:
    """Each part as an image Instance, an Instance without an image (acknowledged, not segmented) or a Failure with
    its reason; a SOPInstanceUID sent twice in one request counts once. Headers only: pixels are the worker's."""
    instances: list[Instance] = []
    others: list[Instance] = []
    failures: list[Failure] = []
    seen: set[str] = set()
    for index, part in enumerate(parts):
        media = part.headers.get("content-type", MEDIA_DICOM).split(";")[0].strip().lower()
        if media != MEDIA_DICOM:
            failures.append(Failure(None, None, CANNOT_UNDERSTAND, f"part {index + 1} is {media}, not {MEDIA_DICOM}"))
            continue
        data = part.data
        try:
            with quiet():
                ds = dcmread(opener(data), stop_before_pixels=True)
            uids = [
                str(ds.get(k, "") or "")
                for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
            ]
        except Exception as exc:  # untrusted bytes: pydicom raises OSError, struct.error, NotImplementedError, ...
            failures.append(Failure(None, None, CANNOT_UNDERSTAND, f"part {index + 1}: {type(exc).__name__}"))
            continue
        sop_class, sop_instance, study_uid, series_uid = uids
        if not all(uids):
            failures.append(
                Failure(sop_class or None, sop_instance or None, CANNOT_UNDERSTAND, f"part {index + 1}: UIDs missing")
            )
            continue
        if study is not None and study_uid != study:
            failures.append(
                Failure(sop_class, sop_instance, DOES_NOT_MATCH, f"part {index + 1}: another study than the URL's")
            )
            continue
        if sop_instance in seen:  # a sender's retry inside one request: stored once
            continue
        seen.add(sop_instance)
        (instances if holds_image(ds) else others).append(
            Instance(index, sop_class, sop_instance, study_uid, series_uid, data)
        )
    return instances, others, failures


def by_series(instances: Sequence[Instance]) -> dict[str, list[Instance]]:
    series: dict[str, list[Instance]] = {}
    for instance in instances:
        series.setdefault(instance.series_uid, []).append(instance)
    return series


def _sop_item(sop_class: str | None, sop_instance: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    return item


def stow_response(
    stored: Sequence[tuple[Instance, str]], failures: Sequence[Failure], ignored: Sequence[Instance] = ()
) -> tuple[int, dict[str, Any]]:
    """The status and DICOM JSON body; ``stored`` pairs each accepted instance with its job's URL; ``ignored`` are
    acknowledged with a warning and no URL (nothing to segment in them)."""
    body: dict[str, Any] = {}
    if stored or ignored:
        body["00081199"] = {
            "vr": "SQ",
            "Value": [
                {**_sop_item(i.sop_class_uid, i.sop_instance_uid), "00081190": {"vr": "UR", "Value": [url]}}
                for i, url in stored
            ]
            + [
                {**_sop_item(i.sop_class_uid, i.sop_instance_uid), "00081196": {"vr": "US", "Value": [NOT_SEGMENTED]}}
                for i in ignored
            ],
        }
    if failures:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {**_sop_item(f.sop_class_uid, f.sop_instance_uid), "00081197": {"vr": "US", "Value": [f.reason]}}
                for f in failures
            ],
        }
    status = 200 if not failures and not ignored else 202 if stored or ignored else 409
    return status, body


async def collect(
    request: Request, principal: Principal, instances: list[Instance], deliver: str | None
) -> list[tuple[Instance, str]]:
    """Series assembly (``dicomweb.assembly_quiet_s``): keep the instances until their series is quiet
    (service/dataplane/assembly.py submits it). An instance already part of a job answers with that job's URL; a
    new one with the series lookup, which lists the job once it exists."""
    queue: JobQueue = request.app.state.queue
    stored: list[tuple[Instance, str]] = []
    for series_uid, members in by_series(instances).items():
        given = [(i.sop_instance_uid, whole(i.data)) for i in members]  # kept in Redis as they are, one by one
        jobs = await keep_for_assembly(queue, request.app.state.models, principal.tenant, series_uid, deliver, given)
        lookup = f"{request.app.url_path_for('jobs_for_series')}?series_uid={series_uid}"
        for instance, job in zip(members, jobs, strict=True):
            path = lookup if job is None else str(request.app.url_path_for("get_job", job_id=job))
            stored.append((instance, public_url(request, path)))
        if fresh := sum(job is None for job in jobs):
            await request.app.state.access.record("submit", principal, API, None, instances=fresh, assembling=1)
    return stored


async def store(request: Request, principal: Principal, study: str | None) -> JSONResponse:
    settings: Settings = request.app.state.settings
    limits = settings.limits
    declared_length(request, limits.max_upload_bytes)
    boundary = boundary_of(request.headers.get("content-type", ""))
    too_many = f"more than {limits.max_files} instances in one request; the limit is {limits.max_files}"
    async with multipart.received_parts(
        request, boundary, limits.max_upload_bytes, limits.max_files, too_many
    ) as parts:
        if not parts:
            raise InvalidRequest("the request holds no DICOM parts")
        return await _store(request, principal, study, parts)


async def _store(request: Request, principal: Principal, study: str | None, parts: list[Part]) -> JSONResponse:
    settings: Settings = request.app.state.settings
    metrics: Metrics = request.app.state.metrics
    instances, ignored, failures = await run_in_threadpool(identify, parts, study)
    queue: JobQueue = request.app.state.queue
    deliver = "dicomweb" if settings.dicomweb.destination_url is not None else None
    stored: list[tuple[Instance, str]] = []
    if settings.dicomweb.assembly_quiet_s > 0 and instances:
        stored = await collect(request, principal, instances, deliver)
        instances = []
    key = idempotency_key(request.headers.get(IDEMPOTENCY_HEADER))
    for series, members in by_series(instances).items():
        # Named by position, not by UID: names reach error messages, and UIDs identify a patient's study.
        files = [(f"instance-{i.index + 1}.dcm", i.data) for i in members]
        try:
            job = await submit_upload(
                queue,
                request.app.state.models,
                files,
                settings.limits,
                None,
                tenant=principal.tenant,
                idempotency_key=None if key is None else f"{key}\0{series}",  # one job per series of the study
                source=API,
                deliver=deliver,
            )
        except ServiceError as err:
            if err.http_status >= 500:
                raise  # Redis away: the whole request is retried by the sender, nothing half-stored matters
            reason = REASONS.get(err.code, PROCESSING_FAILURE)
            failures += [Failure(i.sop_class_uid, i.sop_instance_uid, reason, err.message) for i in members]
            metrics.request_failure.labels(API, err.code).inc()
            log.info("STOW-RS: a series of %d instances refused: %s", len(members), err.code)
            continue
        await request.app.state.access.record("submit", principal, API, job.id, instances=len(members))
        url = public_url(request, str(request.app.url_path_for("get_job", job_id=job.id)))
        stored += [(i, url) for i in members]
        metrics.request_success.labels(API).inc()
        log.info("STOW-RS: job %s for a series of %d instances", job.id, len(members))
    for failure in failures:
        if failure.reason == CANNOT_UNDERSTAND:
            log.info("STOW-RS: refused an instance: %s", failure.message)
    status, body = stow_response(stored, failures, ignored)
    if status >= 400:  # none stored: the access log's line (gateway/app.py) quotes the answer's FailureReasons
        request.state.error_code = ",".join(sorted({f"0x{f.reason:04X}" for f in failures}))
    return JSONResponse(body, status_code=status, media_type=MEDIA_DICOM_JSON)


@router.post("/dicomweb/studies", summary="STOW-RS: store instances (one job per series)", openapi_extra=STOW_BODY)
async def store_instances(request: Request, principal: Caller) -> JSONResponse:
    return await store(request, principal, None)


@router.post("/dicomweb/studies/{study}", summary="STOW-RS: store instances of one study", openapi_extra=STOW_BODY)
async def store_study_instances(request: Request, study: str, principal: Caller) -> JSONResponse:
    return await store(request, principal, study)
