"""A C-STORE SCP (pynetdicom) that feeds DICOM series into the same series assembly as STOW-RS.

A hospital's PACS sends a series instance by instance over an association to an AE title; each instance is
checked here on its header (DICOM, the UIDs a series needs, the upload limit), kept in the series assembly
(service/queue/assembly.py) and acknowledged; once the series is quiet a gateway submits it as one job, which meets
every check and limit an HTTP upload meets (an instance the service cannot use is answered 0xC000, the service
being unable to take anything 0xA700, so the sender retries later). Finished SEGs go back by C-STORE when
``dimse.destination`` is set (service/outputs/dimse_send.py). Only calling AE titles on the allowlist may associate.

pynetdicom runs associations in threads of its own; each instance is handed to the service's event loop and
waited for, so an acknowledgement is sent only once the instance is stored in Redis.
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

from pydicom import dcmread

from service.auth import Principal
from service.config import Settings
from service.dataplane.assembly import keep_for_assembly
from service.dataplane.models import ModelDirectory
from service.errors import ServiceError
from service.inputs.dicom.headers import holds_image
from service.inputs.sniff import quiet
from service.ops.audit import AuditLog
from service.queue import JobQueue

log = logging.getLogger(__name__)

API = "dimse"
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
# How long an instance may take to reach Redis before the sender is told to retry.
STORE_TIMEOUT_S = 30.0


def check_exposure(settings: Settings) -> None:
    """An open DIMSE port (no allowlist) only on a loopback address, as for an HTTP port without credentials."""
    if settings.dimse.port and not settings.dimse.allowed() and settings.host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(
            f"dimse.port {settings.dimse.port} on {settings.host} with no dimse.allowed_calling_aes: any AE could send "
            "studies; name the calling AE titles allowed, or bind to 127.0.0.1"
        )


class Receiver:
    def __init__(
        self,
        settings: Settings,
        queue: JobQueue,
        models: ModelDirectory,
        audit: AuditLog,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.models = models
        self.audit = audit
        self.loop = loop
        self.deliver = "dimse" if settings.dimse.destination else None
        self.server: Any = None

    def start(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        config = self.settings.dimse
        ae = AE(ae_title=config.ae_title)
        ae.maximum_associations = config.max_associations
        ae.maximum_pdu_size = config.max_pdu
        ae.require_called_aet = True
        allowed = config.allowed()
        if allowed:
            ae.require_calling_aet = allowed
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)]
        self.server = ae.start_server((self.settings.host, config.port), block=False, evt_handlers=handlers)
        log.info("DIMSE C-STORE SCP %s on %s:%d", config.ae_title, self.settings.host, config.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def handle_store(self, event: Any) -> int:
        """One instance: kept for its series (or acknowledged and dropped when it has no image); the status."""
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            data = event.encoded_dataset()
        except Exception:
            return CANNOT_UNDERSTAND
        if len(data) > self.settings.limits.max_upload_bytes:
            log.info("DIMSE: an instance from %s over the upload limit", calling)
            return OUT_OF_RESOURCES
        try:
            with quiet():
                header = dcmread(io.BytesIO(data), stop_before_pixels=True)
            sop_class, sop_uid, series_uid = (
                str(header.get(k, "") or "") for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID")
            )
        except Exception:
            return CANNOT_UNDERSTAND
        if not (sop_class and sop_uid and series_uid):
            return CANNOT_UNDERSTAND
        if not holds_image(header):  # as STOW-RS: acknowledged, not kept
            return SUCCESS
        principal = Principal(tenant=f"dimse:{calling}", subject=calling, method="dimse-ae")
        future = asyncio.run_coroutine_threadsafe(self._keep(principal, series_uid, sop_uid, data), self.loop)
        try:
            future.result(STORE_TIMEOUT_S)
        except ServiceError as err:
            log.warning("DIMSE: an instance from %s not kept: %s", calling, err.code)
            return OUT_OF_RESOURCES if err.http_status >= 500 or err.code == "queue_full" else CANNOT_UNDERSTAND
        except Exception as err:  # Redis slow or away past the timeout: the sender retries
            log.warning("DIMSE: an instance from %s not kept (%s)", calling, type(err).__name__)
            future.cancel()
            return OUT_OF_RESOURCES
        return SUCCESS

    async def _keep(self, principal: Principal, series_uid: str, sop_uid: str, data: bytes) -> None:
        kept = [(sop_uid, data)]
        (job,) = await keep_for_assembly(self.queue, self.models, principal.tenant, series_uid, self.deliver, kept)
        if job is None:  # a resend of an instance already part of a job is acknowledged and not kept again
            await self.audit.record("submit", principal, API, None, instances=1, assembling=1)


def _transfer_syntaxes() -> list[str]:
    from pydicom.uid import AllTransferSyntaxes

    return list(AllTransferSyntaxes)


ALL_TRANSFER_SYNTAXES = _transfer_syntaxes()
