"""Several models at once (issue 19): a repository of NAME/VERSION/ export folders, one stream per artifact, requests
pinned to a version answered by exactly that one, real Redis and real engines."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import onnx
import pytest
import redis.asyncio as aioredis

from models.files import CARD_FILE, ONNX_FILE, sha256_file
from service.config import QueueSettings, WorkerSettings
from service.dataplane.models import Version, served_by, served_versions
from service.errors import ArtifactInvalid, InvalidRequest, ModelNotFound
from service.ops.metrics import Metrics
from service.repository import ModelEntry, narrow, parse_reference, scan
from service.worker.served import load_models
from tests.service.harness import disc_image, make_settings, png_bytes, running
from tests.service.test_service import upload


def variant_copy(exported: Path, target: Path, tag: str) -> Path:
    """The export folder again with other bytes (a doc string), so another digest: a model of its own to route to."""
    shutil.copytree(exported, target)
    graph = onnx.load(str(target / ONNX_FILE), load_external_data=False)
    graph.doc_string = f"copy {tag}"
    onnx.save(graph, str(target / ONNX_FILE))
    card = json.loads((target / CARD_FILE).read_text())
    card["artifacts"][ONNX_FILE]["sha256"] = sha256_file(target / ONNX_FILE)
    (target / CARD_FILE).write_text(json.dumps(card))
    return target


@pytest.fixture(scope="module")
def repository(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    variant_copy(exported, root / "alpha" / "1", "1")
    variant_copy(exported, root / "alpha" / "2", "2")
    (root / "alpha" / "bad version").mkdir()  # not a plain name: skipped
    (root / "beta" / "1").mkdir(parents=True)  # no card: skipped
    (root / ".hidden").mkdir()  # not a plain name: skipped
    return root


def digest(folder: Path) -> str:
    return json.loads((folder / CARD_FILE).read_text())["artifacts"][ONNX_FILE]["sha256"]


def test_scan_keeps_export_folders_and_skips_the_rest(repository: Path) -> None:
    found = scan(repository)
    assert [(e.name, e.version) for e in found] == [("alpha", "1"), ("alpha", "2")]


@pytest.mark.parametrize("bad", ["../alpha", "alpha/1", "", ".x", "a" * 65, "alpha:", "alpha:1/2", "al pha"])
def test_references_with_path_characters_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="is not allowed"):
        parse_reference(bad)


def test_references() -> None:
    assert parse_reference("alpha") == ("alpha", None)
    assert parse_reference("alpha:2") == ("alpha", "2")


def test_narrowing_names_what_is_missing(repository: Path) -> None:
    available = [ModelEntry(None, None, "c2p-test-64", default=True), *scan(repository)]
    assert [e.label() for e in narrow(available, "alpha:2")] == ["alpha:2"]
    assert [e.label() for e in narrow(available, "alpha, c2p-test-64")] == ["alpha:1", "alpha:2", "c2p-test-64"]
    assert narrow(available, None) == available
    with pytest.raises(ValueError, match="'alpha:3', which is not in the repository"):
        narrow(available, "alpha:3")


def test_resolution_rules() -> None:
    d1, d2, d3 = "1" * 64, "2" * 64, "3" * 64
    workers = [
        {
            "models": [
                {"name": "alpha", "version": "1", "digest": d1},
                {"name": "base", "version": "x", "digest": d3, "default": True},
            ]
        },
        {"models": [{"name": "alpha", "version": "10", "digest": d2}, {"name": "broken"}]},
    ]
    known = served_versions(workers, [{"name": "alpha", "version": "9", "digest": "9" * 64}])
    assert served_by(known, "alpha", None).target == Version("alpha", "10", d2)  # newest, numerically
    assert served_by(known, "alpha", None).versions == ("1", "9", "10")
    assert served_by(known, "alpha", "1").target.digest == d1
    assert served_by(known, "alpha", d2[:12]).target.version == "10"  # a digest prefix pins too
    assert served_by(known, "alpha", "9").target.live is False  # registered only: its jobs wait for a worker
    assert served_by(known, None, None).target.name == "base"
    assert served_by(known, "c2p", None).target.name == "base"
    with pytest.raises(ModelNotFound, match="no version '3'"):
        served_by(known, "alpha", "3")
    with pytest.raises(ModelNotFound, match="unknown model 'gamma'"):
        served_by(known, "gamma", None)
    without_default = [v for v in known if v.name != "base"]
    assert served_by(without_default, None, None).target.name == "alpha"  # one name served: it is the default


def test_a_broken_repository_model_is_left_out_and_the_others_served(
    exported: Path, repository: Path, tmp_path: Path, redis_url: str, queue_settings: QueueSettings
) -> None:
    root = tmp_path / "repo"
    shutil.copytree(repository, root)
    (root / "alpha" / "2" / ONNX_FILE).write_bytes(b"not a graph")  # its digest no longer matches its card
    settings = make_settings(redis_url, queue_settings, exported).model_copy(update={"model_repository": root})
    loaded = load_models(settings)
    assert [(m.name, m.version) for m in loaded] == [("c2p-test-64", loaded[0].version), ("alpha", "1")]
    with pytest.raises(ArtifactInvalid, match="does not match"):
        narrowed = settings.model_copy(update={"worker": WorkerSettings(models="alpha:2", warmup=False)})
        load_models(narrowed)  # a model named explicitly must load


def test_memory_budget_is_checked_at_start(
    exported: Path, repository: Path, redis_url: str, queue_settings: QueueSettings
) -> None:
    settings = make_settings(redis_url, queue_settings, exported, memory_budget_mb=1)
    settings = settings.model_copy(update={"model_repository": repository})
    with pytest.raises(ValueError, match=r"over worker\.memory_budget_mb 1"):
        load_models(settings)


def test_two_models_served_side_by_side(
    exported: Path, repository: Path, redis_url: str, queue_settings: QueueSettings
) -> None:
    settings = make_settings(redis_url, queue_settings, exported).model_copy(update={"model_repository": repository})
    models = load_models(settings)
    image = png_bytes(disc_image())
    d1, d2 = digest(repository / "alpha" / "1"), digest(repository / "alpha" / "2")
    assert len({d1, d2, digest(exported)}) == 3

    async def scenario() -> None:
        async with running(settings, models) as (http, _):

            async def model_of(query: str) -> dict:
                answer = await http.post(f"/v1/segmentations?wait=30{query}", files=upload(("disc.png", image)))
                assert answer.status_code == 200, answer.text
                return answer.json()["result"]["model"]

            one, two, newest, default = await asyncio.gather(
                model_of("&model=alpha:1"), model_of("&model=alpha:2"), model_of("&model=alpha"), model_of("")
            )
            assert (one["name"], one["version"], one["digest"]) == ("alpha", "1", d1)
            assert (two["version"], two["digest"]) == ("2", d2)
            assert newest["digest"] == d2
            assert (default["name"], default["digest"]) == ("c2p-test-64", digest(exported))
            assert (await model_of(f"&model=alpha:{d1[:12]}"))["version"] == "1"

            missing = await http.post("/v1/segmentations?model=alpha:3", files=upload(("disc.png", image)))
            assert missing.status_code == 404 and missing.json()["code"] == "model_not_found", missing.text
            assert "versions served: 1, 2" in missing.json()["message"]
            bad = await http.post("/v1/segmentations?model=../alpha", files=upload(("disc.png", image)))
            assert bad.status_code == 400 and bad.json()["code"] == "invalid_request"

            index = (await http.get("/v2/models")).json()["models"]
            assert {(m["name"], m["version"], m["state"]) for m in index} == {
                ("alpha", "1", "READY"),
                ("alpha", "2", "READY"),
                ("c2p-test-64", digest(exported)[:12], "READY"),
            }
            meta = await http.get("/v2/models/alpha/versions/1")
            assert meta.status_code == 200 and meta.json()["properties"]["digest"] == d1
            assert (await http.get("/v2/models/alpha/versions/7")).status_code == 404
            assert (await http.get("/v2/models/alpha/versions/2/ready")).status_code == 200

    asyncio.run(scenario())


def test_jobs_wait_in_their_models_stream(
    exported: Path, repository: Path, redis_url: str, queue_settings: QueueSettings
) -> None:
    """With no worker up, the gateway routes by the models it can read (a pool scaled to zero wakes on its stream)."""
    settings = make_settings(redis_url, queue_settings, exported).model_copy(update={"model_repository": repository})
    image = png_bytes(disc_image())

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            queued = await http.post("/v1/segmentations?model=alpha:1", files=upload(("disc.png", image)))
            assert queued.status_code == 202, queued.text
            client = http._transport.app.state.redis  # the gateway's own client
            prefix = queue_settings.prefix
            assert await client.xlen(f"{prefix}:jobs:{digest(repository / 'alpha' / '1')[:12]}") == 1
            assert await client.xlen(f"{prefix}:jobs:{digest(repository / 'alpha' / '2')[:12]}") == 0
            index = (await http.get("/v2/models")).json()["models"]
            assert {m["state"] for m in index} == {"UNAVAILABLE"}
            assert (await http.get("/v2/models/alpha/ready")).status_code == 503
            deleted = await http.delete(f"/v1/segmentations/{queued.json()['id']}")
            assert deleted.status_code == 204, deleted.text
            assert await client.xlen(f"{prefix}:jobs:{digest(repository / 'alpha' / '1')[:12]}") == 0

    asyncio.run(scenario())


def test_grpc_calls_choose_their_model(
    exported: Path, repository: Path, redis_url: str, queue_settings: QueueSettings
) -> None:
    """c2p.v1's ``model`` field and the Open Inference Protocol's name and version pick the model as REST does."""
    import grpc

    from service.grpc import inference_pb2, inference_pb2_grpc
    from service.grpc.inference import inference_registration
    from tests.service.test_grpc import png_request, serving

    settings = make_settings(redis_url, queue_settings, exported).model_copy(update={"model_repository": repository})
    models = load_models(settings)
    d1 = digest(repository / "alpha" / "1")

    async def scenario() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        registration = inference_registration(settings, client, Metrics())
        async with serving(settings, services=(registration,)) as s:
            await s.start_worker(models)
            reply = await s.stub.Segment(png_request(wait_s=30, model="alpha:1"))
            assert (reply.result.model.name, reply.result.model.version, reply.result.model.digest) == (
                "alpha",
                "1",
                d1,
            )
            streamed = await s.stub.SegmentStream(
                iter([segmentation_pb2_chunk(png_request().files[0].data, model="alpha:2")])
            )
            assert streamed.status == "queued"
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await s.stub.Segment(png_request(model="alpha:9"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND, missing.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await s.stub.Segment(png_request(model="../alpha"))
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            oip = inference_pb2_grpc.GRPCInferenceServiceStub(s.channel)
            meta = await oip.ModelMetadata(inference_pb2.ModelMetadataRequest(name="alpha", version="2"))
            assert list(meta.versions) == ["1", "2"]
            assert (await oip.ModelReady(inference_pb2.ModelReadyRequest(name="alpha", version="2"))).ready
            assert not (await oip.ModelReady(inference_pb2.ModelReadyRequest(name="alpha", version="3"))).ready
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await oip.ModelMetadata(inference_pb2.ModelMetadataRequest(name="alpha", version="3"))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        await client.aclose()

    asyncio.run(scenario())


def segmentation_pb2_chunk(data: bytes, **fields: object):
    from service.grpc import segmentation_pb2

    return segmentation_pb2.SegmentChunk(name="disc.png", data=data, last=True, **fields)


def test_the_default_model_answers_to_its_variant_name(
    exported: Path, repository: Path, redis_url: str, queue_settings: QueueSettings
) -> None:
    """``C2P_MODEL`` is a folder in the images (/opt/c2p/model); C2P_WORKER__MODELS names it by its card's variant."""
    settings = make_settings(redis_url, queue_settings, exported, models="c2p-test-64,alpha:2")
    settings = settings.model_copy(update={"model_repository": repository})
    assert [(m.name, m.version, m.default) for m in load_models(settings)] == [
        ("c2p-test-64", digest(exported)[:12], True),
        ("alpha", "2", False),
    ]


def test_a_job_lost_with_its_worker_is_reclaimed_on_its_own_models_stream(
    exported: Path, repository: Path, redis_url: str, queue_settings: QueueSettings
) -> None:
    """The janitor of a worker holding several models looks at every one of their streams."""
    from service.queue import JobQueue
    from service.queue.keys import lane_of

    queue = queue_settings.model_copy(update={"lease_s": 0.5})
    settings = make_settings(redis_url, queue, exported).model_copy(update={"model_repository": repository})
    models = load_models(settings)
    lane = lane_of(digest(repository / "alpha" / "2"))

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        jobs = JobQueue(client, queue, lane=lane)
        try:
            await jobs.ensure_group()
            meta = {
                "format": "png",
                "model": {"name": "alpha", "version": "2", "digest": digest(repository / "alpha" / "2")},
            }
            job = await jobs.submit([("disc.png", png_bytes(disc_image()))], meta, tenant="t1")
            (taken,) = await jobs.read("a-worker-that-dies", 1, block_ms=100)  # taken, never finished
            assert taken.job_id == job.id and (await jobs.get(job.id)).status == "running"
            async with running(settings, models) as (_, worker):
                for _ in range(200):
                    if (await jobs.get(job.id)).status == "succeeded":
                        break
                    await asyncio.sleep(0.05)
                done = await jobs.get(job.id)
                assert done.status == "succeeded" and done.deliveries == 2
                assert done.result.model.digest == digest(repository / "alpha" / "2")
                assert worker is not None
        finally:
            await client.aclose()

    asyncio.run(scenario())
