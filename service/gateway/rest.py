"""The service's own REST API, /v1/segmentations: submit an upload, read its job, fetch its result, delete it.

A thin adapter over the data plane: it reads multipart uploads and query parameters, calls the queue and the
submission path, and writes the shared error table's answers as ``{"code", "message"}`` bodies.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.access import Access
from service.config import Settings
from service.dataplane.jobs import failure
from service.dataplane.jobs import series_uid as check_series_uid
from service.dataplane.models import ModelDirectory
from service.dataplane.submit import IDEMPOTENCY_HEADER, idempotency_key, modality_hint, submit_upload
from service.errors import InvalidRequest, ResultNotReady, ServiceError
from service.gateway.identity import Caller, error_headers
from service.gateway.uploads import received_files
from service.outputs import formats as outputs
from service.queue import JobQueue
from service.repository import parse_reference
from service.schema import ErrorInfo, Job

API = "rest"

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
    return JSONResponse(body, status_code=err.http_status, headers=error_headers(err))


router = APIRouter()


def queue_of(request: Request) -> JobQueue:
    return request.app.state.queue


def access_of(request: Request) -> Access:
    return request.app.state.access


@router.post(
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
    model: Annotated[
        str | None,
        Query(description="NAME or NAME:VERSION (see GET /v2/models); default: the default model's newest version"),
    ] = None,
    series_uid: Annotated[
        str | None, Query(max_length=64, description="of an upload holding several DICOM series, the one to segment")
    ] = None,
    key: Annotated[
        str | None,
        Header(
            alias=IDEMPOTENCY_HEADER,
            description="a retry with the same key gets the job the first request made (per tenant, while it lives)",
        ),
    ] = None,
) -> Any:
    started = time.perf_counter()
    settings: Settings = request.app.state.settings
    if wait is not None and wait > settings.queue.max_wait_s:
        raise InvalidRequest(f"wait may be at most {settings.queue.max_wait_s:g} seconds")
    hint = modality_hint(modality)
    key = idempotency_key(key)
    name, version = parse_reference(model) if model is not None else (None, None)
    if series_uid is not None:
        check_series_uid(series_uid)
    models: ModelDirectory = request.app.state.models
    await models.route(name, version)  # an unknown model or version is refused before the upload is read
    queue = queue_of(request)
    async with received_files(request, settings.limits) as files:
        job = await submit_upload(
            queue,
            models,
            files,
            settings.limits,
            hint,
            tenant=principal.tenant,
            model=name,
            version=version,
            series_uid=series_uid,
            trace_parent=request.headers,
            idempotency_key=key,
        )
    await access_of(request).record("submit", principal, API, job.id)
    location = f"/v1/segmentations/{job.id}"
    if wait:
        job = await queue.wait(job.id, wait, tenant=principal.tenant)
    if (err := failure(job)) is not None:
        request.app.state.metrics.request_failure.labels(API, err.code).inc()
        return error_response(err, job.id)
    request.app.state.metrics.succeeded(API, started)
    if job.status == "succeeded":
        response.status_code = 200
    response.headers["Location"] = location
    return job


class SeriesJobs(BaseModel):
    jobs: list[Job]


@router.get("/v1/segmentations", response_model=SeriesJobs, responses=ERROR_RESPONSES)
async def jobs_for_series(
    request: Request,
    principal: Caller,
    series_uid: Annotated[str, Query(min_length=1, max_length=64, description="the DICOM SeriesInstanceUID sent")],
) -> SeriesJobs:
    """The caller's jobs (and their results) for a DICOM series it sent, oldest first: how a PACS bridge finds the
    result of a series without keeping job ids."""
    jobs = await queue_of(request).jobs_for_series(principal.tenant, check_series_uid(series_uid))
    for job in jobs:
        await access_of(request).record("read", principal, API, job.id)
    return SeriesJobs(jobs=jobs)


@router.get("/v1/segmentations/{job_id}", response_model=Job, responses=ERROR_RESPONSES)
async def get_job(request: Request, job_id: str, principal: Caller) -> Job:
    job = await queue_of(request).get(job_id, tenant=principal.tenant)
    await access_of(request).record("read", principal, API, job_id)
    return job


@router.get(
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
    if (err := failure(job)) is not None:
        return error_response(err, job.id)
    if job.status != "succeeded" or job.result is None:
        raise ResultNotReady(f"the job is {job.status}; ask again when it has succeeded")
    result = job.result
    limits = request.app.state.settings.limits
    budget = 4 * limits.max_voxels + limits.max_upload_bytes  # preview + headers, raw
    members = await queue.outputs(job_id, outputs.needed(fmt, index, result), budget)
    seg = request.app.state.settings.seg
    body = await run_in_threadpool(outputs.render, fmt, result, members, index, seg)
    await access_of(request).record("fetch", principal, API, job_id, format=fmt)
    name = f"{job_id}{outputs.EXTENSIONS[fmt]}"
    return Response(
        body,
        media_type=outputs.MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'inline; filename="{name}"', "Cache-Control": "private, max-age=60"},
    )


@router.delete("/v1/segmentations/{job_id}", status_code=204, responses=ERROR_RESPONSES)
async def delete_job(request: Request, job_id: str, principal: Caller) -> Response:
    await queue_of(request).delete(job_id, tenant=principal.tenant)
    await access_of(request).record("delete", principal, API, job_id)
    return Response(status_code=204)
