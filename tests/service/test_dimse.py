"""The DICOM DIMSE door (issue 20, item 5): a PACS C-STOREs a series to the service's AE title, one instance at a
time; the series becomes one job once quiet, and its DICOM SEG comes back by C-STORE to the destination AE. Sent
twice: one job, one SEG. Real associations (pynetdicom on both sides, dcmtk's storescu where installed)."""

from __future__ import annotations

import asyncio
import io
import random
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
import redis.asyncio as aioredis
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, SegmentationStorage, Verification

from service.config import DimseSettings, QueueSettings, Settings
from service.dataplane.models import ModelDirectory
from service.dimse.receiver import Receiver, check_exposure
from service.ops.audit import AuditLog
from service.queue import JobQueue
from tests.service.harness import engine_for, free_port, make_settings, running
from tests.service.orthanc import orthanc_available, running_orthanc
from tests.service.test_inputs import ct_series

QUIET_S = 1.0
SEG_CLASS = str(SegmentationStorage)


def forty_slices() -> list[tuple[str, bytes]]:
    """The issue's 40-instance CT series, in a shuffled order (positions, not arrival, decide the stack)."""
    order = tuple(random.Random(40).sample(range(40), 40))
    return ct_series(40, order)[0]


class Destination:
    """The AE results go back to: a C-STORE SCP that keeps what it receives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[pydicom.Dataset] = []
        ae = AE(ae_title="DEST")
        ae.add_supported_context(SegmentationStorage)

        def keep(event) -> int:
            self.received.append(event.dataset)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, keep)])


def send(port: int, files: list[bytes], calling: str = "TESTSCU") -> list[int]:
    """C-STORE each instance over one association; the statuses."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    association = ae.associate("127.0.0.1", port, ae_title="C2P")
    if not association.is_established:
        return []
    try:
        return [int(association.send_c_store(pydicom.dcmread(io.BytesIO(f))).Status) for f in files]
    finally:
        association.release()


@pytest.fixture
def destination() -> Destination:
    target = Destination()
    yield target
    target.server.shutdown()


def dimse_settings(redis_url: str, queue: QueueSettings, exported: Path, destination: Destination | str) -> Settings:
    """The service's DIMSE door on a free port; SEGs go to ``destination`` (the test's SCP, or AE@host:port)."""
    settings = make_settings(redis_url, queue, exported)
    dimse = DimseSettings(
        port=free_port(),
        allowed_calling_aes="TESTSCU,STORESCU,ORTHANC",
        quiet_s=QUIET_S,
        destination=destination if isinstance(destination, str) else f"DEST@127.0.0.1:{destination.port}",
        attempts=2,
        backoff_s=0.1,
    )
    return settings.model_copy(update={"dimse": dimse})


def receiver_for(settings: Settings, client: aioredis.Redis, queue: JobQueue) -> Receiver:
    """The receiver as the runner builds it, on this event loop."""
    models = ModelDirectory.for_settings(client, settings)
    return Receiver(settings, queue, models, AuditLog(client, settings), asyncio.get_running_loop())


async def wait_for(predicate, what: str, timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


def test_a_series_c_stored_comes_back_as_one_seg_and_twice_is_still_one(
    redis_url: str, queue_settings: QueueSettings, exported: Path, destination: Destination
) -> None:
    settings = dimse_settings(redis_url, queue_settings, exported, destination)
    instances = [data for _, data in ct_series()[0]]
    series_uid = str(pydicom.dcmread(io.BytesIO(instances[0])).SeriesInstanceUID)

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        queue = JobQueue(client, settings.queue)
        receiver = receiver_for(settings, client, queue)
        try:
            async with running(settings, engine_for(exported)):
                receiver.start()
                assert await asyncio.to_thread(send, settings.dimse.port, instances) == [0] * 4

                async def one_seg() -> bool:
                    return len(destination.received) == 1

                await wait_for(one_seg, "a SEG at the destination")
                (seg,) = destination.received
                assert seg.SOPClassUID == SegmentationStorage
                assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
                assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 4  # one volume of four

                async def recorded_sent() -> bool:  # the destination may have it a moment before the record says so
                    (job,) = await queue.jobs_for_series("dimse:TESTSCU", series_uid)
                    return job.forwarding is not None and job.forwarding.status == "sent"

                await wait_for(recorded_sent, "the job's forwarding recorded as sent")
                (job,) = await queue.jobs_for_series("dimse:TESTSCU", series_uid)
                assert job.status == "succeeded" and job.forwarding.attempts == 1

                assert await asyncio.to_thread(send, settings.dimse.port, instances) == [0] * 4  # the PACS resends
                await asyncio.sleep(3 * QUIET_S)
                assert len(await queue.jobs_for_series("dimse:TESTSCU", series_uid)) == 1
                assert len(destination.received) == 1

                assert await asyncio.to_thread(send, settings.dimse.port, instances[:1], "EVIL") == []  # not allowed
                echo = AE(ae_title="TESTSCU")
                echo.add_requested_context(Verification)
                association = echo.associate("127.0.0.1", settings.dimse.port, ae_title="C2P")
                assert association.is_established and int(association.send_c_echo().Status) == 0
                association.release()
        finally:
            await asyncio.to_thread(receiver.stop)
            await client.aclose()

    asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk's storescu is not installed (Debian: dcmtk)")
def test_dcmtk_storescu_sends_a_series(
    redis_url: str, queue_settings: QueueSettings, exported: Path, destination: Destination, tmp_path: Path
) -> None:
    settings = dimse_settings(redis_url, queue_settings, exported, destination)
    files = []
    for name, data in forty_slices():
        (tmp_path / name).write_bytes(data)
        files.append(str(tmp_path / name))
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        queue = JobQueue(client, settings.queue)
        receiver = receiver_for(settings, client, queue)
        try:
            async with running(settings, engine_for(exported)):
                receiver.start()
                command = ["storescu", "-aet", "STORESCU", "-aec", "C2P", "127.0.0.1", str(settings.dimse.port), *files]
                done = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=60)
                assert done.returncode == 0, done.stderr.decode(errors="replace")

                async def finished() -> bool:
                    jobs = await queue.jobs_for_series("dimse:STORESCU", series_uid)
                    return bool(jobs) and jobs[0].status == "succeeded"

                await wait_for(finished, "storescu's series segmented", 120)

                async def sent_back() -> bool:
                    return len(destination.received) == 1

                await wait_for(sent_back, "its SEG sent back")
                (seg,) = destination.received
                assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 40  # one volume of forty
        finally:
            await asyncio.to_thread(receiver.stop)
            await client.aclose()

    asyncio.run(scenario())


@pytest.mark.skipif(orthanc_available() is not None, reason=orthanc_available() or "")
def test_orthanc_c_stores_a_series_and_gets_its_seg_back_once(
    redis_url: str, queue_settings: QueueSettings, exported: Path, tmp_path: Path
) -> None:
    """Orthanc as the hospital's PACS on both ends: it C-STOREs a 40-slice CT series to our AE title (its own
    DIMSE client, not ours), and the SEG comes back to its own C-STORE SCP; a resend gives no second job or SEG."""
    instances = [data for _, data in forty_slices()]
    first = pydicom.dcmread(io.BytesIO(instances[0]), stop_before_pixels=True)
    series_uid, study_uid = str(first.SeriesInstanceUID), str(first.StudyInstanceUID)

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        queue = JobQueue(client, queue_settings)
        port = free_port()  # ours, known before Orthanc starts so its modality table can name it
        overrides = {"DicomModalities": {"c2p": ["C2P", "127.0.0.1", port]}, "DicomScuTimeout": 30}
        with running_orthanc(tmp_path / "orthanc", dicom_server=True, config_overrides=overrides) as orthanc:
            settings = dimse_settings(redis_url, queue_settings, exported, f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
            settings = settings.model_copy(update={"dimse": settings.dimse.model_copy(update={"port": port})})
            receiver = receiver_for(settings, client, queue)
            try:
                async with running(settings, engine_for(exported)):
                    receiver.start()
                    series_id = {orthanc.upload(data)["ParentSeries"] for data in instances}.pop()

                    def c_store_from_orthanc() -> None:
                        orthanc.post("/modalities/c2p/store", {"Resources": [series_id], "Synchronous": True})

                    def segs() -> list[dict]:
                        return [i for i in orthanc.instances_of_study(study_uid) if i["SOPClassUID"] == SEG_CLASS]

                    await asyncio.to_thread(c_store_from_orthanc)
                    (seg_entry,) = await asyncio.to_thread(orthanc.wait_for, segs, 120)
                    seg = pydicom.dcmread(io.BytesIO(orthanc.download(seg_entry["ID"])))
                    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
                    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 40
                    assert "RESEARCH USE ONLY" in seg.SeriesDescription

                    async def recorded_sent() -> bool:
                        (job,) = await queue.jobs_for_series("dimse:ORTHANC", series_uid)
                        return job.forwarding is not None and job.forwarding.status == "sent"

                    await wait_for(recorded_sent, "the job's forwarding recorded as sent")

                    await asyncio.to_thread(c_store_from_orthanc)  # the PACS sends the series again
                    await asyncio.sleep(3 * QUIET_S)
                    assert len(await queue.jobs_for_series("dimse:ORTHANC", series_uid)) == 1
                    (again,) = await asyncio.to_thread(segs)
                    assert again["SOPInstanceUID"] == seg.SOPInstanceUID
            finally:
                await asyncio.to_thread(receiver.stop)
                await client.aclose()

    asyncio.run(scenario())


def test_an_open_dimse_port_is_refused_beyond_loopback() -> None:
    settings = Settings(host="0.0.0.0", dimse=DimseSettings(port=11112))
    with pytest.raises(ValueError, match=r"no dimse\.allowed_calling_aes"):
        check_exposure(settings)
    check_exposure(settings.model_copy(update={"dimse": DimseSettings(port=11112, allowed_calling_aes="PACS")}))
    check_exposure(Settings(host="127.0.0.1", dimse=DimseSettings(port=11112)))
