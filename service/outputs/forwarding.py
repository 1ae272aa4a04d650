"""Sending finished DICOM SEG objects on to the PACS a study came from: a DICOMweb server (STOW-RS) or a DICOM AE
(C-STORE, service/outputs/dimse_send.py), whichever way the study arrived.

A PACS that is restarting or briefly overloaded must not lose results, and one that refuses them must not be
retried forever: each SEG gets ``attempts`` tries with doubling back-off, permanent refusals (4xx other than 408
and 429, or a STOW-RS answer listing the instance as failed) end it at once, and every step is recorded with the
job (``Job.forwarding``) so an operator can see what did not arrive and why. Sending runs in the background of the
worker, off the job's path: the job is already succeeded when forwarding starts. A worker that stops waits for
sends in flight up to its drain timeout, then records the rest as failed.

dicomweb-client does the HTTP (multipart/related encoding, the STOW-RS response parsing); it is synchronous, so
each send runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from service.config import DicomWebSettings
from service.ops.metrics import Metrics
from service.queue import JobQueue
from service.schema import Forwarding

log = logging.getLogger(__name__)

RETRYABLE_HTTP = frozenset({408, 425, 429})


class Refused(Exception):
    """The destination answered and said no: retrying the same object would get the same answer."""


def public_url(url: str) -> str:
    """The URL without user:password, fit for the job's record and logs."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def store(settings: DicomWebSettings, seg: bytes) -> str:
    """One STOW-RS request with the SEG; its SOP Instance UID when the destination stored it."""
    dataset = dcmread(io.BytesIO(seg))
    client = DICOMwebClient(
        url=str(settings.destination_url).rstrip("/"),
        headers=dict(settings.destination_headers),
        timeout=settings.timeout_s,
    )
    client.set_http_retry_params(retry=False)  # retries are ours: counted, spaced and recorded with the job
    try:
        answer = client.store_instances([dataset])
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if 400 <= status < 500 and status not in RETRYABLE_HTTP:
            raise Refused(f"HTTP {status} from the destination") from exc
        raise
    finally:
        with contextlib.suppress(Exception):
            client._session.close()  # dicomweb-client offers no public close
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        reason = failed[0].get("FailureReason")
        raise Refused(f"the destination refused the instance (FailureReason {reason:#06x})" if reason else "refused")
    return str(dataset.SOPInstanceUID)


@dataclass
class _Send:
    job_id: str
    seg: bytes


class Forwarder:
    """The worker's background sender (module docstring): ``send_one`` stores one SEG at the destination (in a thread)
    and returns its SOP Instance UID, raises ``Refused`` for a permanent refusal and ``OSError`` (or a requests error)
    for one worth retrying."""

    def __init__(
        self,
        send_one: Callable[[bytes], str],
        destination: str,
        attempts: int,
        backoff_s: float,
        queue: JobQueue,
        metrics: Metrics,
        secret: str | None = None,
    ) -> None:
        self.send_one = send_one
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.queue = queue
        self.metrics = metrics
        self.destination = destination
        self.secret = secret  # what never reaches a record or a log (a URL with credentials)
        self.tasks: set[asyncio.Task] = set()

    @classmethod
    def dicomweb(cls, settings: DicomWebSettings, queue: JobQueue, metrics: Metrics) -> Forwarder:
        if settings.destination_url is None:
            raise ValueError("no dicomweb.destination_url to forward to")
        destination = public_url(settings.destination_url)
        return cls(
            lambda seg: store(settings, seg),
            destination,
            settings.attempts,
            settings.backoff_s,
            queue,
            metrics,
            secret=settings.destination_url,
        )

    def send(self, job_id: str, seg: bytes) -> None:
        task = asyncio.create_task(self._send(_Send(job_id, seg)), name=f"forward-{job_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def failed(self, job_id: str, reason: str) -> None:
        """A SEG that could not even be made (the input had no usable geometry): recorded like a refusal."""
        await self._note(job_id, "failed", 0, None, reason)
        self.metrics.forwarded.labels("failed").inc()

    async def close(self, timeout_s: float) -> None:
        """Let sends in flight finish for up to ``timeout_s``; the rest are cancelled and recorded as failed."""
        if not self.tasks:
            return
        _, pending = await asyncio.wait(set(self.tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)

    async def _send(self, item: _Send) -> None:
        delay = self.backoff_s
        error = ""
        attempt = 0
        try:
            for attempt in range(1, self.attempts + 1):
                await self._note(item.job_id, "pending", attempt - 1, None, error or None)
                try:
                    uid = await asyncio.to_thread(self.send_one, item.seg)
                except Refused as exc:
                    error = str(exc)
                    break
                except (requests.RequestException, OSError) as exc:
                    error = f"{type(exc).__name__}: {self._short(exc)}"
                    if attempt < self.attempts:
                        log.info("job %s: forwarding attempt %d failed (%s); retrying", item.job_id, attempt, error)
                        await asyncio.sleep(delay)
                        delay *= 2
                    continue
                await self._note(item.job_id, "sent", attempt, uid, None)
                self.metrics.forwarded.labels("sent").inc()
                log.info("job %s: DICOM SEG sent to %s", item.job_id, self.destination)
                return
        except asyncio.CancelledError:
            error = "the worker stopped before the SEG could be sent"
            await asyncio.shield(self._note(item.job_id, "failed", attempt, None, error))
            self.metrics.forwarded.labels("failed").inc()
            raise
        await self._note(item.job_id, "failed", attempt, None, error)
        self.metrics.forwarded.labels("failed").inc()
        log.warning("job %s: DICOM SEG not sent to %s: %s", item.job_id, self.destination, error)

    def _short(self, exc: BaseException) -> str:
        """An exception's text with the destination's credentials taken out, cut to a readable length."""
        text = str(exc).replace(self.secret, self.destination) if self.secret else str(exc)
        return text if len(text) <= 200 else text[:200] + "..."

    async def _note(self, job_id: str, status: str, attempts: int, uid: str | None, error: str | None) -> None:
        record = Forwarding(
            status=status,  # type: ignore[arg-type]
            attempts=attempts,
            destination=self.destination,
            sop_instance_uid=uid,
            error=error,
            updated_at=datetime.now(UTC),
        )
        try:
            await self.queue.note_forwarding(job_id, record)
        except Exception as exc:  # Redis away: the send goes on; the record catches up at the next step
            log.warning("job %s: cannot record forwarding (%s)", job_id, type(exc).__name__)
