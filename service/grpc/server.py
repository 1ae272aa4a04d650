"""The gRPC server (grpc.aio): composes the c2p.v1 API and further services (the Open Inference Protocol) with
health checking, reflection, limits and keepalive. How a handler maps errors and names its caller is calls.py's.

Health follows REST readiness: SERVING only while Redis answers and a warm worker has announced itself,
because a gateway replica without workers behind it would accept jobs that nobody runs. The status is
refreshed in the background, never per check, so a probe storm costs Redis nothing.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service.access import Access
from service.auth import Authenticator
from service.config import GrpcSettings, Settings
from service.dataplane.jobs import stop_task
from service.dataplane.models import ModelDirectory, is_ready
from service.grpc import segmentation_pb2, segmentation_pb2_grpc
from service.grpc.calls import Registration, RpcNames
from service.grpc.segmentation import SegmentationService
from service.ops.metrics import Metrics
from service.queue import JobQueue

__all__ = ["Registration", "build_server", "server_credentials", "stop_server"]


def server_options(config: GrpcSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        # Keep pinging through a long wait in which no data flows (the default stops after 2 pings).
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(config.min_client_ping_interval_s * 1000)),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        # Linux's default SO_REUSEPORT would let a second server bind a port in use and share its traffic.
        ("grpc.so_reuseport", 0),
    ]


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# Per server: its health servicer and refresh task, so that ``stop_server`` can reach them.
_RUNTIME: weakref.WeakKeyDictionary[grpc.aio.Server, tuple[health_aio.HealthServicer, asyncio.Task[None]]] = (
    weakref.WeakKeyDictionary()
)


def build_server(
    settings: Settings,
    client: aioredis.Redis,
    metrics: Metrics,
    grpc_settings: GrpcSettings | None = None,
    services: Sequence[Registration] = (),
    authenticator: Authenticator | None = None,
) -> grpc.aio.Server:
    """The server, bound to ``settings.host:settings.grpc_port`` (insecure), not yet started.

    Call it from the event loop that will run the server: it starts the health refresh there. Start it
    with ``await server.start()``; stop it with ``stop_server`` (health goes NOT_SERVING first).
    ``grpc_settings`` defaults to ``settings.grpc``; ``authenticator`` to one built from ``settings``.
    """
    config = grpc_settings or settings.grpc
    loop = asyncio.get_running_loop()
    server = grpc.aio.server(options=server_options(config), interceptors=[RpcNames()])
    queue = JobQueue(client, settings.queue)

    segmentation_pb2_grpc.add_SegmentationServicer_to_server(
        SegmentationService(
            settings,
            queue,
            ModelDirectory.for_settings(client, settings),
            metrics,
            config,
            Access(settings, client, authenticator),
        ),
        server,
    )
    for registration in services:
        registration.add(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)

    served = [segmentation_pb2.DESCRIPTOR.services_by_name["Segmentation"], *(r.descriptor for r in services)]
    health_descriptor = health_pb2.DESCRIPTOR.services_by_name["Health"]
    reflection_descriptor = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
    everything = [*served, health_descriptor, reflection_descriptor]
    reflection.enable_server_reflection(
        [d.full_name for d in everything], server, pool=_reflection_pool(d.file for d in everything)
    )

    where = address(settings.host, settings.grpc_port)
    try:
        credentials = server_credentials(config)
        if credentials is None:
            server.add_insecure_port(where)
        else:
            server.add_secure_port(where, credentials)
    except RuntimeError as err:
        raise OSError(f"cannot listen for gRPC on {where} (in use, or not a local address)") from err

    # "" is the whole server, as grpc health checkers (Kubernetes' grpc probe) ask by default.
    names = ["", *(d.full_name for d in served)]
    task = loop.create_task(
        _keep_health(server, health, queue, client, settings.queue.prefix, names, config.health_interval_s),
        name="grpc-health",
    )
    _RUNTIME[server] = (health, task)
    return server


def server_credentials(config: GrpcSettings) -> grpc.ServerCredentials | None:
    """TLS from the settings' PEM files; mutual TLS when a client CA is given. None means plaintext."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    try:
        pair = (config.tls_key_file.read_bytes(), config.tls_cert_file.read_bytes())
        client_ca = config.tls_client_ca_file.read_bytes() if config.tls_client_ca_file else None
    except OSError as err:
        raise ValueError(f"cannot read a gRPC TLS file: {err}") from err
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


async def stop_server(server: grpc.aio.Server, grace_s: float | None) -> None:
    """Graceful stop: report NOT_SERVING (load balancers drain), let calls finish for ``grace_s``, stop."""
    runtime = _RUNTIME.get(server)
    if runtime is not None:
        await runtime[0].enter_graceful_shutdown()
    await server.stop(grace_s)
    if runtime is not None:
        await asyncio.gather(runtime[1], return_exceptions=True)  # ends with the server


def _reflection_pool(files: Iterable[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """One pool holding every served file and its imports.

    Reflection answers from a single pool, and the Open Inference Protocol's file lives in a private
    one (see service/grpc/codegen.py), so the default pool alone would not know it.
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in files:
        add(file)
    return pool


async def _keep_health(
    server: grpc.aio.Server,
    health: health_aio.HealthServicer,
    queue: JobQueue,
    client: aioredis.Redis,
    prefix: str,
    names: Sequence[str],
    interval_s: float,
) -> None:
    # The reference servicer starts with "" SERVING. This first step runs before any call can be
    # handled (it was scheduled before the server could even start), so nobody sees that.
    for name in names:
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    refresher = asyncio.create_task(_refresh_health(health, queue, client, prefix, names, interval_s))
    try:
        # Shielded: cancelling a wait on the server's own shutdown future would cancel that future, and
        # the server's stop() awaits it too.
        await asyncio.shield(server.wait_for_termination())
    finally:
        _RUNTIME.pop(server, None)
        await stop_task(refresher)  # cancel until done: redis-py can swallow one cancel mid-command


async def _refresh_health(
    health: health_aio.HealthServicer,
    queue: JobQueue,
    client: aioredis.Redis,
    prefix: str,
    names: Sequence[str],
    interval_s: float,
) -> None:
    current: Any = None
    while True:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if await is_ready(queue, client, prefix, timeout_s=max(interval_s, 0.5))
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if status != current:
            for name in names:
                await health.set(name, status)
            current = status
        await asyncio.sleep(interval_s)
