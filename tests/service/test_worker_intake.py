"""Issue 21, item 5: a worker takes jobs one at a time and bounds what it holds by slices, not by entries, so a
burst of large volumes cannot take more memory than a few of them; a volume larger than the bound still runs, alone.
Real Redis, the real worker, jobs queued before it starts (the burst case)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from service.config import QueueSettings
from tests.service.harness import engine_for, make_settings, running
from tests.service.test_service import nifti_bytes, upload

SLICES = 6
BOUND = 10  # room for one volume of 6 and a second taken while under it: never a third


def volume(seed: int, slices: int = SLICES) -> bytes:
    data = np.random.default_rng(seed).integers(0, 300, (40, 48, slices), dtype=np.int16)
    return nifti_bytes(data, np.diag([1.0, 1.0, 3.0, 1.0]))


def test_the_worker_holds_jobs_by_slices_and_a_large_one_alone(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    settings = make_settings(redis_url, queue_settings, exported, concurrency=8, max_slices_in_flight=BOUND)

    async def scenario() -> None:
        async with running(settings, engine_for(exported), worker=False) as (http, _):
            queued = [await http.post("/v1/segmentations?modality=MR", files=upload((f"{i}.nii.gz", volume(i))))
                      for i in range(6)]  # fmt: skip
            large = await http.post("/v1/segmentations?modality=MR", files=upload(("l.nii.gz", volume(9, 24))))
            ids = [answer.json()["id"] for answer in [*queued, large]]
            assert all(answer.status_code == 202 for answer in [*queued, large])
        async with running(settings, engine_for(exported)) as (http, worker):
            assert worker is not None
            held_jobs, held_slices = [], []
            while True:
                held_jobs.append(len(worker.in_flight))
                held_slices.append(sum(h.slices for h in worker.in_flight.values()))
                statuses = [(await http.get(f"/v1/segmentations/{job_id}")).json()["status"] for job_id in ids]
                if all(status == "succeeded" for status in statuses):
                    break
                assert "failed" not in statuses, statuses
                await asyncio.sleep(0.01)
        assert max(held_jobs) == 2, held_jobs  # with concurrency 8, entries alone would have let in all seven
        assert max(held_slices) <= BOUND - 1 + 24, held_slices  # under the bound, plus the one job taken last
        assert 24 in held_slices  # the large one ran (alone or beside one small job taken before it)

    asyncio.run(scenario())
