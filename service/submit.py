"""One way in for every API: check the upload's headers against the limits, then queue it.

REST, c2p.v1 gRPC, both Open Inference Protocol transports and DICOMweb STOW-RS all refuse the same inputs with the
same errors and describe their jobs with the same meta, because they all come through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from service.config import LimitSettings
from service.inputs import Upload, probe
from service.queue import JobQueue
from service.schema import Job


async def submit_upload(
    queue: JobQueue,
    files: Sequence[Upload],
    limits: LimitSettings,
    modality_hint: str | None,
    **extra: Any,
) -> Job:
    """Probe in a thread (header parsing is CPU work a gateway loop must not do inline), then submit; ``extra``
    joins the job's meta (what the worker needs beyond the files: a tensor's layout, a delivery request)."""
    header = await asyncio.to_thread(probe, list(files), limits, modality_hint)
    meta = {
        "format": header.format,
        "modality": header.modality,
        "shape": list(header.shape),
        "files": header.files,
        "modality_hint": modality_hint,
        "submitted_at": datetime.now(UTC).isoformat(),
        **extra,
    }
    return await queue.submit(files, meta)
