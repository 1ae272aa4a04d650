"""A caller finds its jobs by the DICOM series it sent (issue 20, item 6): GET /v1/segmentations?series_uid=UID lists
them for the caller's tenant only, whichever API submitted them."""

from __future__ import annotations

import asyncio
import io
import zipfile
from pathlib import Path

import pydicom

from service.config import QueueSettings
from service.queue import JobQueue
from tests.service.harness import lane_for, make_settings, running
from tests.service.test_inputs import ct_series
from tests.service.test_service import upload


def test_jobs_are_found_by_their_series_uid(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    files, _ = ct_series()
    series_uid = str(pydicom.dcmread(io.BytesIO(files[0][1])).SeriesInstanceUID)

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            first = await http.post("/v1/segmentations", files=upload(*files))
            second = await http.post("/v1/segmentations", files=upload(*files[:2]))
            assert first.status_code == second.status_code == 202, first.text
            found = await http.get("/v1/segmentations", params={"series_uid": series_uid})
            assert found.status_code == 200, found.text
            assert [j["id"] for j in found.json()["jobs"]] == [first.json()["id"], second.json()["id"]]
            assert (await http.get("/v1/segmentations", params={"series_uid": "1.2.3"})).json() == {"jobs": []}
            bad = await http.get("/v1/segmentations", params={"series_uid": "1.2.x"})
            assert (bad.status_code, bad.json()["code"]) == (400, "invalid_request")
            await http.delete(f"/v1/segmentations/{first.json()['id']}")
            found = await http.get("/v1/segmentations", params={"series_uid": series_uid})
            assert [j["id"] for j in found.json()["jobs"]] == [second.json()["id"]]  # a deleted job is gone
            queue = JobQueue(http._transport.app.state.redis, settings.queue, lane=lane_for(exported))
            assert await queue.jobs_for_series("another-tenant", series_uid) == []  # tenants never see each other's

    asyncio.run(scenario())


def test_one_series_is_picked_out_of_an_upload_that_holds_several(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    """(issue 20, item 2) A study's zip holds several series: ?series_uid= segments the one named."""
    import zipfile

    ct, _ = ct_series()
    relabelled = other_series()
    other_uid = str(pydicom.dcmread(io.BytesIO(relabelled[0][1])).SeriesInstanceUID)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for name, data in [*ct, *relabelled]:
            zipped.writestr(name, data)
    study = upload(("study.zip", archive.getvalue()))
    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            mixed = await http.post("/v1/segmentations", files=study)
            assert mixed.status_code == 422 and "name the one to segment with series_uid" in mixed.json()["message"]
            picked = await http.post("/v1/segmentations", params={"series_uid": other_uid}, files=study)
            assert picked.status_code == 202, picked.text
            found = await http.get("/v1/segmentations", params={"series_uid": other_uid})
            assert [j["id"] for j in found.json()["jobs"]] == [picked.json()["id"]]
            none = await http.post("/v1/segmentations", params={"series_uid": "1.2.3.4"}, files=study)
            assert none.status_code == 422 and "holds 2 other series" in none.json()["message"]

    asyncio.run(scenario())


def other_series() -> list[tuple[str, bytes]]:
    """Two instances of another series than ct_series()'s."""
    other, _ = ct_series(count=2)
    uid = pydicom.uid.generate_uid()
    relabelled = []
    for name, data in other:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.SeriesInstanceUID = uid
        buffer = io.BytesIO()
        ds.save_as(buffer)
        relabelled.append((f"other-{name}", buffer.getvalue()))
    return relabelled


def test_the_series_lookup_over_grpc(redis_url: str, queue_settings: QueueSettings, exported: Path) -> None:
    import grpc
    import pytest

    from service.grpc import segmentation_pb2
    from tests.service.test_grpc import serving

    settings = make_settings(redis_url, queue_settings, exported)
    files, _ = ct_series()
    series_uid = str(pydicom.dcmread(io.BytesIO(files[0][1])).SeriesInstanceUID)

    async def scenario() -> None:
        async with serving(settings) as s:
            request = segmentation_pb2.SegmentRequest(files=[segmentation_pb2.File(name=n, data=d) for n, d in files])
            job = await s.stub.Segment(request)
            listed = await s.stub.ListSegmentations(segmentation_pb2.ListSegmentationsRequest(series_uid=series_uid))
            assert [j.id for j in listed.jobs] == [job.id]
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await s.stub.ListSegmentations(segmentation_pb2.ListSegmentationsRequest(series_uid="1.x"))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # a series picked out of a zip holding two, by the request's series_uid (issue 20, item 2)
            archive = io.BytesIO()
            with zipfile.ZipFile(archive, "w") as zipped:
                for name, data in [*files, *other_series()]:
                    zipped.writestr(name, data)
            study = [segmentation_pb2.File(name="study.zip", data=archive.getvalue())]
            with pytest.raises(grpc.aio.AioRpcError) as mixed:
                await s.stub.Segment(segmentation_pb2.SegmentRequest(files=study))
            assert mixed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "series_uid" in mixed.value.details()
            picked = await s.stub.Segment(segmentation_pb2.SegmentRequest(files=study, series_uid=series_uid))
            listed = await s.stub.ListSegmentations(segmentation_pb2.ListSegmentationsRequest(series_uid=series_uid))
            assert [j.id for j in listed.jobs] == [job.id, picked.id]

    asyncio.run(scenario())
