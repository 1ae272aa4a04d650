"""One DICOM SEG sent by C-STORE to the AE a study came from (``dimse.destination``, AE@host:port), with pynetdicom.

Statuses decide what the forwarder does next: success and the warnings (0xB000, 0xB006, 0xB007) are stored; 0xA7xx
(out of resources) and a destination that does not answer or drops the association are worth another try; a
rejected association or any other failure status is a refusal, the same object would get the same answer.
"""

from __future__ import annotations

import io

from pydicom import dcmread

from service.config import DimseSettings
from service.ops.metrics import Metrics
from service.outputs.forwarding import Forwarder, Refused
from service.queue import JobQueue

STORED = {0x0000, 0xB000, 0xB006, 0xB007}


def destination(settings: DimseSettings) -> tuple[str, str, int]:
    assert settings.destination is not None
    ae, _, where = settings.destination.rpartition("@")
    host, _, port = where.rpartition(":")
    return ae, host, int(port)


def c_store(settings: DimseSettings, seg: bytes) -> str:
    """Associate, C-STORE the SEG, release; its SOP Instance UID when the destination stored it."""
    from pynetdicom import AE

    dataset = dcmread(io.BytesIO(seg))
    called, host, port = destination(settings)
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout_s
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate(host, port, ae_title=called, max_pdu=settings.max_pdu)
    if association.is_rejected:
        raise Refused(f"{called} rejected the association")
    if not association.is_established:
        raise OSError(f"no association with {called} at {host}:{port}")
    try:
        status = association.send_c_store(dataset)
    finally:
        association.release()
    code = int(status.Status) if status is not None and "Status" in status else None
    if code is None:
        raise OSError(f"{called} did not answer the C-STORE")
    if code in STORED:
        return str(dataset.SOPInstanceUID)
    if code & 0xFF00 == 0xA700:
        raise OSError(f"{called} is out of resources (status {code:#06x})")
    raise Refused(f"{called} refused the SEG (status {code:#06x})")


def dimse_forwarder(settings: DimseSettings, queue: JobQueue, metrics: Metrics) -> Forwarder:
    """The worker's background sender for jobs whose study came by DIMSE (retries, records: forwarding.py)."""
    if settings.destination is None:
        raise ValueError("no dimse.destination to forward to")
    return Forwarder(
        lambda seg: c_store(settings, seg), settings.destination, settings.attempts, settings.backoff_s, queue, metrics
    )
