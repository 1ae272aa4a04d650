"""gRPC over TLS and mutual TLS from settings, with certificates made by openssl for the test."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import GrpcSettings, QueueSettings, Settings
from service.grpc.server import build_server, stop_server
from service.ops.metrics import Metrics
from tests.service.test_grpc import free_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=c2p test CA", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, extra in (("server", ["-extfile", "san.ext"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *extra, cwd=d)  # fmt: skip
    return d


async def health_over(target: str, credentials: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status


def run_with(redis_url: str, config: GrpcSettings, check) -> None:
    settings = Settings(redis_url=redis_url, grpc_port=free_port(), queue=QueueSettings(prefix="ttls"), grpc=config)

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        server = build_server(settings, client, Metrics())
        await server.start()
        try:
            await check(f"localhost:{settings.grpc_port}")
        finally:
            await stop_server(server, 0)
            await client.aclose()

    asyncio.run(scenario())


def test_tls_serves_clients_that_trust_the_ca(redis_url: str, pki: Path) -> None:
    config = GrpcSettings(tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key")

    async def check(target: str) -> None:
        trusted = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
        assert await health_over(target, trusted) in (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        async with grpc.aio.insecure_channel(target) as plain:  # plaintext to a TLS port fails
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)

    run_with(redis_url, config, check)


def test_mutual_tls_requires_a_client_certificate(redis_url: str, pki: Path) -> None:
    config = GrpcSettings(
        tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key", tls_client_ca_file=pki / "ca.pem"
    )

    async def check(target: str) -> None:
        ca = (pki / "ca.pem").read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(pki / "client.key").read_bytes(),
            certificate_chain=(pki / "client.pem").read_bytes(),
        )
        await health_over(target, with_cert)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_over(target, grpc.ssl_channel_credentials(root_certificates=ca))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    run_with(redis_url, config, check)


def test_tls_settings_must_come_in_pairs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both"):
        GrpcSettings(tls_cert_file=tmp_path / "a.pem")
    with pytest.raises(ValueError, match="mutual"):
        GrpcSettings(tls_client_ca_file=tmp_path / "ca.pem")
