"""What every gRPC handler does around its RPC: who is calling, how an error ends the call, what is logged.

Errors are mapped without an interceptor: every handler runs inside ``service_errors``, which turns a ServiceError
into the status its class names in service/errors.py (the table the REST handlers read, so both APIs answer alike)
and puts the error code in trailing metadata ``c2p-error-code``, where a client can branch on it without parsing
messages; a full queue also sends ``retry-after`` (seconds). An interceptor cannot do this in grpc.aio: it sees the
call before the handler raises, not the error. A refused call (a client error: the table's 4xx) also logs one line on
``c2p.access`` (``log_rejected``): its status, code, RPC and tenant, never the message; the one interceptor,
``RpcNames``, only names the RPC for it. Both services (c2p.v1 and the Open Inference Protocol) import this; the
server (server.py) composes them.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from service.access import Access
from service.auth import Principal
from service.errors import ResponseTooLarge, RetryLater, ServiceError
from service.ops.metrics import Metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("c2p.access")

API = "grpc"
ERROR_CODE_KEY = "c2p-error-code"
RETRY_AFTER_KEY = "retry-after"
JOB_ID_KEY = "c2p-job-id"
IDEMPOTENCY_METADATA = "idempotency-key"  # Segment, SegmentStream: a retry with the same key gets the first job
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
    if isinstance(err, RetryLater):
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
