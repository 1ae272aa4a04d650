"""STOW-RS series assembly (issue 20, item 4): a series sent over several requests becomes one job once quiet, a
retried instance never makes a second one, and an assembled series that is not one volume is a failed job the
sender finds by its series UID."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.config import DicomWebSettings, QueueSettings
from tests.service.harness import engine_for, make_settings, running
from tests.service.test_dicomweb import REFERENCED, RETRIEVE_URL, items, related, uid_of
from tests.service.test_inputs import ct_series
from tests.service.test_series_validation import series

QUIET_S = 1.0  # long enough that a loaded CI machine posts the three requests within it


async def post(http, *instances: bytes) -> list[str]:
    body, content_type = related(*instances)
    answer = await http.post("/dicomweb/studies", content=body, headers={"content-type": content_type})
    assert answer.status_code == 200, answer.text
    return [i[RETRIEVE_URL]["Value"][0].removeprefix("http://c2p.test") for i in items(answer.json(), REFERENCED)]


async def jobs_once_quiet(http, series_uid: str, count: int = 1) -> list[dict]:
    for _ in range(200):
        jobs = (await http.get("/v1/segmentations", params={"series_uid": series_uid})).json()["jobs"]
        if len(jobs) >= count and all(j["status"] in ("succeeded", "failed") for j in jobs):
            return jobs
        await asyncio.sleep(0.05)
    raise AssertionError(f"no finished job for the series: {jobs}")


def test_a_series_sent_instance_by_instance_is_one_job(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    settings = settings.model_copy(update={"dicomweb": DicomWebSettings(assembly_quiet_s=QUIET_S)})
    ct = [data for _, data in ct_series()[0]]
    series_uid = uid_of(ct[0], "SeriesInstanceUID")

    async def scenario() -> None:
        async with running(settings, engine_for(exported)) as (http, _):
            urls = await post(http, ct[0])
            urls += await post(http, ct[1], ct[2], ct[0])  # the first instance again: a sender's retry
            urls += await post(http, ct[3])
            assert set(urls) == {f"/v1/segmentations?series_uid={series_uid}"}  # the lookup, until there is a job
            (job,) = await jobs_once_quiet(http, series_uid)
            assert job["status"] == "succeeded", job
            assert job["result"]["input"]["shape"][0] == 4  # one volume of the four instances
            again = await post(http, ct[1])  # retried after the job exists: answered with it, no second job
            assert again == [f"/v1/segmentations/{job['id']}"]
            await asyncio.sleep(3 * QUIET_S)
            assert len((await http.get("/v1/segmentations", params={"series_uid": series_uid})).json()["jobs"]) == 1

    asyncio.run(scenario())


def test_an_assembled_series_with_a_gap_is_a_failed_job(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported)
    settings = settings.model_copy(update={"dicomweb": DicomWebSettings(assembly_quiet_s=QUIET_S)})
    gapped = [data for _, data in series([0.0, 2.5, 7.5, 10.0])]
    series_uid = uid_of(gapped[0], "SeriesInstanceUID")

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            for instance in gapped:
                await post(http, instance)
            (job,) = await jobs_once_quiet(http, series_uid)
            assert job["status"] == "failed" and job["error"]["code"] == "invalid_image"
            assert "missing 1 slice" in job["error"]["message"]

    asyncio.run(scenario())
