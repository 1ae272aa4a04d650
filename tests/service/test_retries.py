"""Issue 21, item 7: PACS bridges retry on any dropped connection. An Idempotency-Key (REST and STOW-RS header,
c2p.v1 gRPC metadata) makes a retry return the first job, per tenant; without a key, the same upload from the same
tenant within the dedupe window is the same job; a bad key is a 400."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.config import QueueSettings
from service.queue import JobQueue
from tests.service.harness import disc_image, lane_for, make_settings, png_bytes, running
from tests.service.test_dicomweb import mr_instance, related
from tests.service.test_service import upload


def test_rest_and_stow_rs_retries_get_the_first_job(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    queue = queue_settings.model_copy(update={"dedupe_window_s": 10.0})  # the shipped rule
    settings = make_settings(redis_url, queue, exported)  # no worker: jobs stay queued

    async def scenario() -> None:
        async with running(settings, None) as (http, _):
            image = upload(("disc.png", png_bytes(disc_image())))
            keyed = {"Idempotency-Key": "bridge-7f3a/attempt"}
            first = await http.post("/v1/segmentations", files=image, headers=keyed)
            assert first.status_code == 202, first.text
            # a retry with the key, even with another upload name, is the first job
            retried = await http.post("/v1/segmentations", files=upload(("x.png", png_bytes(disc_image()))),
                                      headers=keyed)  # fmt: skip
            assert retried.json()["id"] == first.json()["id"]
            # without a key: the same request again within the window is the same job; another image is not
            plain = await http.post("/v1/segmentations", files=upload(("other.png", png_bytes(disc_image(radius=9)))))
            again = await http.post("/v1/segmentations", files=upload(("other.png", png_bytes(disc_image(radius=9)))))
            assert again.json()["id"] == plain.json()["id"] != first.json()["id"]
            for bad in ("", "\x01", "x" * 256):
                refused = await http.post("/v1/segmentations", files=image, headers={"Idempotency-Key": bad})
                assert refused.status_code == 400 and refused.json()["code"] == "invalid_request", repr(bad)

            body, content_type = related(mr_instance())
            headers = {"content-type": content_type, "Idempotency-Key": "stow-1"}
            stored = await http.post("/dicomweb/studies", content=body, headers=headers)
            stored_again = await http.post("/dicomweb/studies", content=body, headers=headers)
            assert stored.status_code == stored_again.status_code == 200, stored.text

            def retrieve_urls(answer) -> list[str]:  # ReferencedSOPSequence's RetrieveURL: each instance's job
                return [item["00081190"]["Value"][0] for item in answer.json()["00081199"]["Value"]]

            assert retrieve_urls(stored) == retrieve_urls(stored_again)

            queue = JobQueue(http._transport.app.state.redis, settings.queue, lane=lane_for(exported))
            stats = await queue.stats()
            assert stats.length == 3  # keyed PNG, plain PNG, the STOW-RS series: nothing twice

    asyncio.run(scenario())


def test_grpc_idempotency_key_metadata_gets_the_first_job(
    redis_url: str, queue_settings: QueueSettings, exported: Path
) -> None:
    from tests.service.test_grpc import png_request, serving

    settings = make_settings(redis_url, queue_settings, exported)

    async def scenario() -> None:
        async with serving(settings) as s:
            key = (("idempotency-key", "grpc-retry-1"),)
            first = await s.stub.Segment(png_request(), metadata=key, timeout=10)
            second = await s.stub.Segment(png_request(image=png_bytes(disc_image(radius=11))), metadata=key, timeout=10)
            assert second.id == first.id
            assert (await s.queue.stats()).length == 1

    asyncio.run(scenario())
