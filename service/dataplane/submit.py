"""One way in for every API: check the modality hint and the upload's headers against the limits, then queue it.

REST, c2p.v1 gRPC, both Open Inference Protocol transports and DICOMweb STOW-RS all refuse the same inputs with the
same errors and describe their jobs with the same meta, because they all come through here.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from service.config import LimitSettings
from service.dataplane.models import ModelDirectory
from service.errors import InvalidRequest
from service.inputs import Upload, one_series, probe
from service.inputs.probe import normalise_hint
from service.ops import tracing
from service.queue import JobQueue
from service.schema import Job

# What an Idempotency-Key may hold (IETF draft-ietf-httpapi-idempotency-key-header: a string; here printable ASCII, so
# it can never smuggle a control character into a log line).
IDEMPOTENCY_KEY = re.compile(r"[!-~][ -~]{0,254}")
IDEMPOTENCY_HEADER = "Idempotency-Key"


def idempotency_key(value: str | None) -> str | None:
    """A caller's key for a submit it may retry: a retry with the same key gets the first job (per tenant)."""
    if value is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(value):
        raise InvalidRequest("Idempotency-Key must be 1 to 255 printable ASCII characters")
    return value


# The modality hints a caller may give (DICOM's spelling), for inputs that do not say it themselves.
MODALITIES = ("CT", "MR", "US", "XR", "DX", "CR", "MG", "OCT", "OP", "ES", "SM", "XC", "RGB")


def result_bytes(shape: Sequence[int]) -> int:
    """What a job's result will hold in Redis, at most: the kept outputs' preview (one byte per voxel before
    compression, service/outputs/formats.py) and the JSON result with its RLE masks (a few bytes per row)."""
    z, rows, columns = (int(v) for v in shape[:3])
    return z * rows * columns + z * rows * 8 + (64 << 10)


def modality_hint(value: str | None) -> str | None:
    """A caller's hint in DICOM's spelling; blank means none, anything else must be a known modality."""
    hint = normalise_hint(value)
    if hint is not None and hint not in MODALITIES:
        raise InvalidRequest(f"unknown modality {value!r}; expected one of {', '.join(MODALITIES)}")
    return hint


async def submit_upload(
    queue: JobQueue,
    models: ModelDirectory,
    files: Sequence[Upload],
    limits: LimitSettings,
    modality_hint: str | None,
    *,
    tenant: str,
    model: str | None = None,
    version: str | None = None,
    series_uid: str | None = None,
    trace_parent: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
    dedupe: bool = True,
    **extra: Any,
) -> Job:
    """Find the model's stream, probe in a thread (header parsing is CPU work a gateway loop must not do inline),
    then submit; ``extra`` joins the job's meta (what the worker needs beyond the files: a tensor's layout, a delivery
    request). ``model`` and ``version``: what the caller asked for (None: the default model, its newest version).
    ``series_uid``: of an upload holding several DICOM series, the one to segment. ``tenant``: who owns the job.
    ``trace_parent``: the caller's W3C trace headers, so the job's trace continues theirs. ``idempotency_key``: the
    caller's, already checked (``idempotency_key``); without one a repeat of the same upload within the queue's
    dedupe window is the first job, unless ``dedupe`` is off (a call that deletes its job when it stops waiting
    must own it alone)."""
    target = await models.route(model, version)
    with tracing.span("c2p.submit", trace_parent, **{"c2p.files": len(files)}) as span:
        if series_uid is not None:
            files = await asyncio.to_thread(one_series, files, limits, series_uid)
        header = await asyncio.to_thread(probe, list(files), limits, modality_hint)
        meta = {
            "format": header.format,
            "modality": header.modality,
            "shape": list(header.shape),
            "files": header.files,
            "modality_hint": modality_hint,
            "submitted_at": datetime.now(UTC).isoformat(),
            "model": {"name": target.name, "version": target.version, "digest": target.digest},
            **extra,
        }
        context = tracing.carrier()
        if context:
            meta["trace"] = context
        job = await queue.submit(
            files,
            meta,
            tenant=tenant,
            lane=target.lane,
            idempotency_key=idempotency_key,
            dedupe=dedupe,
            result_bytes=result_bytes(header.shape),
        )
        if header.series_uid:
            await queue.index_series(tenant, header.series_uid, job.id)
        if span is not None:
            span.set_attributes({"c2p.job_id": job.id, "c2p.format": header.format, "c2p.slices": header.shape[0]})
        return job
