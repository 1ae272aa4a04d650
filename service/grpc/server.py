"""The gRPC server (grpc.aio): the c2p.v1 API, health checking, reflection, limits and keepalive.

Errors are mapped without an interceptor: every handler runs inside ``service_errors``, which turns a
ServiceError into the status its class names in service/errors.py (the table the REST handlers read,
so both APIs answer alike) and puts the error code in trailing metadata ``c2p-error-code``, where a
client can branch on it without parsing messages; a full queue also sends ``retry-after`` (seconds).
An interceptor cannot do this in grpc.aio: it sees the call before the handler raises, not the error.
A refused call (a client error: the table's 4xx) also logs one line on ``c2p.access`` (``log_rejected``): its
status, code, RPC and tenant, never the message; the one interceptor, ``RpcNames``, only names the RPC for it.

Health follows REST readiness: SERVING only while Redis answers and a warm worker has announced itself,
because a gateway replica without workers behind it would accept jobs that nobody runs. The status is
refreshed in the background, never per check, so a probe storm costs Redis nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import redis.asyncio as aioredis
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2
from redis.exceptions import RedisError

from service import presence
from service.access import Access
from service.auth import Authenticator, Principal
from service.config import GrpcSettings, Settings
from service.errors import QueueFull, ResponseTooLarge, ServiceError
from service.metrics import Metrics
from service.queue import JobQueue

log = logging.getLogger(__name__)
access_log = logging.getLogger("c2p.access")

API = "grpc"
ERROR_CODE_KEY = "c2p-error-code"
RETRY_AFTER_KEY = "retry-after"
JOB_ID_KEY = "c2p-job-id"
SEGMENTATION_SERVICE = "c2p.v1.Segmentation"

# What the access log's line names: the RPC (set by RpcNames) and the caller's tenant (set by ``caller``). Each call
# runs in a task of its own, so these are per call.
_RPC: contextvars.ContextVar[str | None] = contextvars.ContextVar("c2p_grpc_rpc", default=None)
_TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("c2p_grpc_tenant", default=None)


@dataclass(frozen=True)
class Registration:
    """A further service for ``build_server`` (e.g. the Open Inference Protocol): how to add its servicer,
    and its descriptor, which gives health and reflection its name and its proto file."""

    descriptor: ServiceDescriptor
    add: Callable[[grpc.aio.Server], None]


# -- errors ----------------------------------------------------------------------------------------------


def status_code(err: ServiceError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.grpc_status, grpc.StatusCode.INTERNAL)


def error_metadata(err: ServiceError, job_id: str | None = None) -> tuple[tuple[str, str], ...]:
    metadata = [(ERROR_CODE_KEY, err.code)]
    if isinstance(err, QueueFull):
        metadata.append((RETRY_AFTER_KEY, str(err.retry_after_s)))
    if job_id is not None:
        metadata.append((JOB_ID_KEY, job_id))
    return tuple(metadata)


async def abort(
    context: grpc.aio.ServicerContext, err: ServiceError, metrics: Metrics, job_id: str | None = None
) -> NoReturn:
    """End the call with ``err``'s status, message and code (raises grpc.aio.AbortError)."""
    metrics.request_failure.labels(API, err.code).inc()
    log_rejected(err, API)
    await context.abort(status_code(err), err.message, trailing_metadata=error_metadata(err, job_id))
    raise AssertionError("context.abort returned")  # it always raises; this keeps NoReturn honest


def log_rejected(err: ServiceError, api: str) -> None:
    """One INFO line on ``c2p.access`` for a call refused with a client error (4xx in the error table): the gRPC
    status, the code, the RPC and the tenant once known; never the message. Server errors are logged where they
    happen, as before."""
    if not 400 <= err.http_status < 500:
        return
    entry = {"event": "rejected", "api": api, "status": status_code(err).name, "code": err.code}
    entry["route"] = _RPC.get() or "-"
    tenant = _TENANT.get()
    if tenant is not None:
        entry["tenant"] = tenant
    access_log.info("%s", json.dumps(entry, separators=(",", ":")))


class RpcNames(grpc.aio.ServerInterceptor):
    """Names the RPC of each call (``/c2p.v1.Segmentation/GetSegmentation``) for ``log_rejected``; changes nothing."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        _RPC.set(handler_call_details.method)
        return await continuation(handler_call_details)


@contextlib.asynccontextmanager
async def service_errors(context: grpc.aio.ServicerContext, metrics: Metrics) -> AsyncIterator[None]:
    """Wrap a handler's body: ServiceError -> its status; anything unexpected -> INTERNAL, logged, no details."""
    try:
        yield
    except grpc.aio.AbortError:
        raise  # the handler already chose its status
    except ServiceError as err:
        await abort(context, err, metrics)
    except Exception:
        log.exception("unhandled error in a gRPC handler")
        await abort(context, ServiceError("internal error"), metrics)


# -- server ----------------------------------------------------------------------------------------------


def call_metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata by (lower-case) key: credentials, and a W3C trace carrier (``traceparent``,
    ``tracestate``) so a caller's trace continues."""
    return {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}


trace_headers = call_metadata


async def caller(context: grpc.aio.ServicerContext, access: Access, api: str = API) -> Principal:
    """Who is calling, from ``authorization`` / ``x-api-key`` metadata; Unauthenticated otherwise. Every RPC but
    health and readiness starts with it (a test calls each one without credentials)."""
    principal = await access.caller(call_metadata(context), api)
    _TENANT.set(principal.tenant)
    return principal


def check_response_size(size: int, limit: int, hint: str = "") -> None:
    """Refuse an answer gRPC would refuse to send, with a message that names the setting: grpc core's own
    failure reaches the caller as a bare RESOURCE_EXHAUSTED the server never logs."""
    if size > limit:
        raise ResponseTooLarge(
            f"the answer is {size} bytes, above this server's limit of {limit} (C2P_GRPC__MAX_SEND_MESSAGE_BYTES){hint}"
        )


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
    # Imported here: the servicer module imports the error mapping above.
    from service.grpc import segmentation_pb2, segmentation_pb2_grpc
    from service.grpc.segmentation import SegmentationService

    config = grpc_settings or settings.grpc
    loop = asyncio.get_running_loop()
    server = grpc.aio.server(options=server_options(config), interceptors=[RpcNames()])
    queue = JobQueue(client, settings.queue)

    segmentation_pb2_grpc.add_SegmentationServicer_to_server(
        SegmentationService(settings, queue, metrics, config, Access(settings, client, authenticator)), server
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


async def ready(queue: JobQueue, client: aioredis.Redis, prefix: str, timeout_s: float = 2.0) -> bool:
    """REST readiness, as a bool: Redis answers and at least one warm worker has announced itself."""
    if not await queue.ping(timeout_s):
        return False
    try:
        async with asyncio.timeout(timeout_s):
            return bool(await presence.ready_workers(client, prefix))
    except (RedisError, OSError, ValueError):  # TimeoutError is an OSError; ValueError: a bad announcement
        return False


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
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)


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
            if await ready(queue, client, prefix, timeout_s=max(interval_s, 0.5))
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        if status != current:
            for name in names:
                await health.set(name, status)
            current = status
        await asyncio.sleep(interval_s)
