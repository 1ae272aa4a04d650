"""Every rejected request leaves one INFO line on ``c2p.access``: status, code, route template, method, tenant.

Against the real gateway app (and the real gRPC server) on real Redis, with API keys so the tenant is known. The
line never holds the raw path where a route matched (ids, a study UID), the query string or the error's message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from service.auth import entry_for, new_key
from service.config import QueueSettings, Settings
from service.grpc import inference_pb2, inference_pb2_grpc, segmentation_pb2, segmentation_pb2_grpc
from service.grpc.inference import inference_registration
from service.grpc.server import build_server, stop_server
from service.ops.metrics import Metrics
from tests.service.harness import free_port, running
from tests.service.test_dicomweb import related

KEY = new_key()
KEYS = entry_for("radiology", KEY)
AUTH = {"authorization": f"Bearer {KEY}"}
JOB_ID = "AAAAAAAAAAAAAAAAAAAAAA"
SECRET = "Doe^Jane"  # stands for anything a request could carry that must not be logged


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "c2p.access"]


def settings_for(redis_url: str, queue: QueueSettings) -> Settings:
    return Settings(redis_url=redis_url, queue=queue, api_keys=KEYS)


def test_each_rejected_rest_request_logs_one_line(
    redis_url: str, queue_settings: QueueSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="c2p.access")
    settings = settings_for(redis_url, queue_settings)

    async def call(
        http: httpx.AsyncClient, method: str, url: str, **kwargs: Any
    ) -> tuple[int, str, list[dict[str, object]]]:
        caplog.clear()
        answer = await http.request(method, url, **kwargs)
        return answer.status_code, answer.text, access_lines(caplog)

    async def scenario() -> None:
        async with running(settings, None, worker=False) as (http, _):
            status, _, lines = await call(http, "GET", f"/v1/segmentations/{JOB_ID}?note={SECRET}", headers=AUTH)
            assert status == 404
            assert lines == [
                {
                    "event": "rejected",
                    "api": "rest",
                    "status": 404,
                    "code": "job_not_found",
                    "method": "GET",
                    "route": "/v1/segmentations/{job_id}",
                    "tenant": "radiology",
                }
            ]

            status, text, lines = await call(http, "POST", f"/v1/segmentations?modality={SECRET}", headers=AUTH)
            assert status == 400 and SECRET in text  # the answer quotes the value; the log line does not
            assert len(lines) == 1 and SECRET not in json.dumps(lines)
            assert lines[0]["code"] == "invalid_request" and lines[0]["route"] == "/v1/segmentations"
            assert lines[0]["method"] == "POST" and lines[0]["tenant"] == "radiology"

            status, _, lines = await call(http, "POST", "/v1/segmentations?wait=-1", headers=AUTH)  # FastAPI's check
            assert status == 400 and [(x["code"], x["route"]) for x in lines] == [
                ("invalid_request", "/v1/segmentations")
            ]

            status, _, lines = await call(http, "GET", f"/v1/segmentations/{JOB_ID}/result?format=png")
            assert status == 401 and len(lines) == 1
            assert lines[0]["code"] == "unauthenticated" and "tenant" not in lines[0]
            assert lines[0]["route"] == "/v1/segmentations/{job_id}/result"

            status, _, lines = await call(http, "GET", f"/v2/models/{SECRET}", headers=AUTH)  # the v2 error shape
            assert status == 404 and SECRET not in json.dumps(lines)
            assert [(x["api"], x["code"], x["route"], x["tenant"]) for x in lines] == [
                ("kserve-rest", "model_not_found", "/v2/models/{model}", "radiology")
            ]

            body, content_type = related(b"not dicom at all")
            study = "1.2.826.0.1.3680043.8.498.1"
            status, _, lines = await call(
                http, "POST", f"/dicomweb/studies/{study}", content=body, headers={**AUTH, "content-type": content_type}
            )
            assert status == 409 and len(lines) == 1
            assert lines[0]["api"] == "stow-rs" and lines[0]["code"] == "0xC000"
            assert lines[0]["route"] == "/dicomweb/studies/{study}" and study not in json.dumps(lines)

            status, _, lines = await call(http, "GET", f"/no/such/route?note={SECRET}")
            assert status == 404 and len(lines) == 1
            assert lines[0]["code"] == "not_found" and lines[0]["route"] == "/no/such/route"

            status, _, lines = await call(http, "DELETE", "/v2/health/live")
            assert status == 405 and [x["code"] for x in lines] == ["method_not_allowed"]

            # answered without a rejection: no line; 5xx stay with their own logging
            assert (await call(http, "GET", "/v2/health/live"))[::2] == (200, [])
            assert (await call(http, "GET", "/v2/health/ready"))[::2] == (503, [])

    asyncio.run(scenario())


def test_each_rejected_grpc_call_logs_one_line(
    redis_url: str, queue_settings: QueueSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="c2p.access")
    settings = settings_for(redis_url, queue_settings).model_copy(update={"grpc_port": free_port()})
    metadata = (("authorization", f"Bearer {KEY}"),)

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        metrics = Metrics()
        server = build_server(settings, client, metrics, services=[inference_registration(settings, client, metrics)])
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
                c2p = segmentation_pb2_grpc.SegmentationStub(channel)
                oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
                job = segmentation_pb2.GetSegmentationRequest(id=JOB_ID)

                caplog.clear()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await c2p.GetSegmentation(job, metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.NOT_FOUND
                assert access_lines(caplog) == [
                    {
                        "event": "rejected",
                        "api": "grpc",
                        "status": "NOT_FOUND",
                        "code": "job_not_found",
                        "route": "/c2p.v1.Segmentation/GetSegmentation",
                        "tenant": "radiology",
                    }
                ]

                caplog.clear()  # the next call knows no tenant: nothing is left over from the last one
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await c2p.DeleteSegmentation(segmentation_pb2.DeleteSegmentationRequest(id=JOB_ID))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert [(x["code"], x["route"], x.get("tenant")) for x in access_lines(caplog)] == [
                    ("unauthenticated", "/c2p.v1.Segmentation/DeleteSegmentation", None)
                ]

                caplog.clear()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await oip.ModelMetadata(inference_pb2.ModelMetadataRequest(name=SECRET), metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.NOT_FOUND and SECRET in refused.value.details()
                assert [(x["api"], x["code"], x["route"], x["tenant"]) for x in access_lines(caplog)] == [
                    ("kserve-grpc", "model_not_found", "/inference.GRPCInferenceService/ModelMetadata", "radiology")
                ]
                assert SECRET not in caplog.text
        finally:
            await stop_server(server, 0)
            await client.aclose()

    asyncio.run(scenario())
