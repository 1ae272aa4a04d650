"""Series that arrived over several STOW-RS requests, submitted as one job once quiet (service/queue/assembly.py).

Each gateway runs ``assemble`` while ``dicomweb.assembly_quiet_s`` is set; whichever claims a quiet series submits
it through ``submit_upload``, so an assembled series meets every check and limit a single request would. A series
the checks refuse (a gap, a 4D series) becomes a failed job the sender finds by its series UID; one that cannot be
submitted now (Redis away, no model routable) goes back to wait for the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from service.config import Settings
from service.dataplane.models import ModelDirectory
from service.dataplane.submit import submit_upload
from service.errors import ServiceError
from service.queue import JobQueue
from service.queue.assembly import Assembled
from service.schema import Job

log = logging.getLogger(__name__)

SOURCE = "stow-rs"


async def keep_for_assembly(
    queue: JobQueue,
    models: ModelDirectory,
    tenant: str,
    series_uid: str,
    deliver: str | None,
    instances: list[tuple[str, bytes]],
) -> list[str | None]:
    """Keep ``(SOPInstanceUID, bytes)`` of one series until it is quiet (STOW-RS and DIMSE alike); per instance, the
    job it is already part of (a sender's retry, not kept again) or None when it was kept now. Unavailable while no
    model is routable: refused now rather than kept for a series nobody can segment."""
    await models.route(None, None)
    jobs = await queue.assembly.jobs_of(tenant, [uid for uid, _ in instances])
    fresh = [item for item, job in zip(instances, jobs, strict=True) if job is None]
    if fresh:
        await queue.assembly.add(tenant, series_uid, deliver, fresh)
    return jobs


async def submit_assembled(
    queue: JobQueue, models: ModelDirectory, settings: Settings, series: Assembled
) -> Job | None:
    """One job for the series (or its failure); None when it was put back to be tried again."""
    files = [(f"instance-{k + 1}.dcm", data) for k, data in enumerate(series.instances.values())]
    try:
        job = await submit_upload(
            queue,
            models,
            files,
            settings.limits,
            None,
            tenant=series.tenant,
            source=SOURCE,
            deliver=series.deliver,
            assembled=len(files),
        )
    except ServiceError as err:
        if err.http_status >= 500 or err.code == "queue_full":
            await queue.assembly.add(series.tenant, series.series_uid, series.deliver, list(series.instances.items()))
            log.warning("STOW-RS: an assembled series of %d instances waits: %s", len(files), err.code)
            return None
        job = await queue.create_failed(series.tenant, {"source": SOURCE, "instances": len(files)}, err)
        await queue.index_series(series.tenant, series.series_uid, job.id)
        log.info("STOW-RS: an assembled series of %d instances refused: %s", len(files), err.code)
    await queue.assembly.remember(series.tenant, list(series.instances), job.id)
    log.info("STOW-RS: job %s for an assembled series of %d instances", job.id, len(files))
    return job


def quiet_period(settings: Settings) -> float:
    """How long a series must be quiet to be submitted: STOW-RS's setting, else DIMSE's when its door is open (a
    C-STORE sender always sends a series instance by instance); 0: nothing to assemble."""
    if settings.dicomweb.assembly_quiet_s > 0:
        return settings.dicomweb.assembly_quiet_s
    return settings.dimse.quiet_s if settings.dimse.port else 0.0


async def assemble(queue: JobQueue, models: ModelDirectory, settings: Settings, stopping: asyncio.Event) -> None:
    """Submit quiet series until ``stopping``; a failed round is logged and the next one tries again."""
    quiet = quiet_period(settings)
    interval = min(max(quiet / 4, 0.05), 1.0)
    while not stopping.is_set():
        try:
            for series in await queue.assembly.take_due(quiet):
                await submit_assembled(queue, models, settings, series)
        except ServiceError as err:  # Redis away: the series stay where they are
            log.warning("STOW-RS assembly: %s", err.code)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval)
