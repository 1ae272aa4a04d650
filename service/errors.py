"""The one error table: every failure a caller can see has a code, an HTTP status and a gRPC status.

REST handlers and gRPC interceptors both read these attributes, so the two APIs cannot disagree.
Error bodies are ``{"code": ..., "message": ...}``; messages never carry patient data.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class Unauthenticated(ServiceError):
    """No credential, or one that does not check out (unknown key, bad signature, wrong issuer or audience, expired).

    One answer for all of them, so a caller probing keys learns nothing about which part failed; the audit log
    records the reason."""

    code = "unauthenticated"
    http_status = 401
    grpc_status = "UNAUTHENTICATED"


class ArtifactNotFound(ServiceError):
    """The configured model artifact is missing; the service cannot become ready."""

    code = "artifact_not_found"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class ArtifactInvalid(ServiceError):
    """The artifact exists but does not match its card (digest, inputs, outputs) or cannot be loaded."""

    code = "artifact_invalid"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class InvalidTensor(ServiceError):
    """A batch handed to the engine has the wrong shape, dtype or values."""

    code = "invalid_tensor"
    http_status = 400
    grpc_status = "INVALID_ARGUMENT"


class InvalidRequest(ServiceError):
    """The request itself is malformed: no file, an unknown parameter value, a bad job id."""

    code = "invalid_request"
    http_status = 400
    grpc_status = "INVALID_ARGUMENT"


class PayloadTooLarge(ServiceError):
    """The upload's bytes exceed the limit (checked while reading, before anything is stored)."""

    code = "payload_too_large"
    http_status = 413
    grpc_status = "RESOURCE_EXHAUSTED"


class ImageTooLarge(ServiceError):
    """The headers declare more pixels, slices, files or voxels than the limits allow."""

    code = "image_too_large"
    http_status = 413
    grpc_status = "RESOURCE_EXHAUSTED"


class ResponseTooLarge(ServiceError):
    """The answer would exceed the transport's message limit (gRPC's ``max_send_message_bytes``).

    Checked before sending, so the caller reads which limit to raise or which smaller output to ask for, instead
    of a bare transport error. 413 on REST for symmetry, though REST streams its answers and never raises it."""

    code = "response_too_large"
    http_status = 413
    grpc_status = "RESOURCE_EXHAUSTED"


class UnsupportedFormat(ServiceError):
    """Not DICOM, NIfTI, PNG, JPEG or a zip of DICOM files."""

    code = "unsupported_format"
    http_status = 415
    grpc_status = "INVALID_ARGUMENT"


class UnsupportedMediaType(ServiceError):
    """A request body of a media type the endpoint does not take (STOW-RS answers 415 for these, PS3.18 10.5.3)."""

    code = "unsupported_media_type"
    http_status = 415
    grpc_status = "INVALID_ARGUMENT"


class InvalidImage(ServiceError):
    """A recognised format whose content is broken or cannot be segmented (truncated, bad header,
    no pixel data, a transfer syntax no installed decoder handles, mixed series)."""

    code = "invalid_image"
    http_status = 422
    grpc_status = "INVALID_ARGUMENT"


class UnsupportedTransferSyntax(InvalidImage):
    code = "unsupported_transfer_syntax"


class JobNotFound(ServiceError):
    """Unknown, expired or deleted job (the same answer for all three: ids reveal nothing)."""

    code = "job_not_found"
    http_status = 404
    grpc_status = "NOT_FOUND"


class ResultNotReady(ServiceError):
    """A result or one of its formats was asked for while the job is still queued or running, or it failed."""

    code = "result_not_ready"
    http_status = 409
    grpc_status = "FAILED_PRECONDITION"


class OutputNotAvailable(ServiceError):
    """The job succeeded but this format cannot be made for it: DICOM SEG of a non-DICOM input, a slice outside
    the volume, or what the format needs was not kept or has expired."""

    code = "output_not_available"
    http_status = 404
    grpc_status = "NOT_FOUND"


class RetryLater(ServiceError):
    """Back-pressure: a refusal that carries when to try again (REST's Retry-After, gRPC's retry-after metadata)."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(RetryLater):
    """The queue (or the caller's tenant's share of it) holds its maximum of pending jobs; retry after a few
    seconds."""

    code = "queue_full"
    http_status = 429
    grpc_status = "RESOURCE_EXHAUSTED"


class StorageFull(RetryLater):
    """Redis holds what it may of jobs (its memory budget, queue.max_bytes or a share of maxmemory): nothing of this
    upload was stored; retry after a few seconds, as jobs end and free their memory."""

    code = "storage_full"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class UploadsBusy(RetryLater):
    """The gateway is reading as many uploads as it may at once (limits.max_concurrent_uploads); nothing of this one
    was read; retry after a few seconds, or send it to another gateway replica."""

    code = "uploads_busy"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class Unavailable(ServiceError):
    """Redis does not answer or no worker is ready: a transient state, not the caller's fault."""

    code = "unavailable"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class DeliveryLimit(ServiceError):
    """The job was delivered ``max_deliveries`` times and never finished: it failed the service every time (its
    message names the last error). The service's failure, not proof that the input is bad, so a 5xx; the other jobs
    went through, and a copy waits in the dead-letter stream for an operator."""

    code = "delivery_limit"
    http_status = 500
    grpc_status = "INTERNAL"


class JobTimeout(ServiceError):
    """The job ran past its timeout (worker.job_timeout_s plus its share per slice) and was stopped; dead-lettered."""

    code = "job_timeout"
    http_status = 504
    grpc_status = "DEADLINE_EXCEEDED"


class EngineHung(ServiceError):
    """An engine call did not return within worker.batch_timeout_s; the job is handed back to be tried again."""

    code = "engine_hung"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class ModelNotFound(ServiceError):
    """A model name or version nobody serves (the error table's 404 is about jobs; the status is what counts)."""

    code = "model_not_found"
    http_status = 404
    grpc_status = "NOT_FOUND"


class DeadlineExceeded(ServiceError):
    """The job did not finish within the wait; it has been deleted."""

    code = "deadline_exceeded"
    http_status = 504
    grpc_status = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    """The client hung up while waiting; its job has been deleted. 499 as nginx logs it: nobody reads the answer."""

    code = "cancelled"
    http_status = 499
    grpc_status = "CANCELLED"


class WorkerFailed(RuntimeError):
    """Not a caller's error: the worker judged itself broken (hung engine threads) and stopped; its process exits
    non-zero so that its supervisor starts a fresh one."""


ERRORS: tuple[type[ServiceError], ...] = (
    ServiceError,
    Unauthenticated,
    ArtifactNotFound,
    ArtifactInvalid,
    InvalidTensor,
    InvalidRequest,
    PayloadTooLarge,
    ImageTooLarge,
    ResponseTooLarge,
    UnsupportedFormat,
    UnsupportedMediaType,
    InvalidImage,
    UnsupportedTransferSyntax,
    JobNotFound,
    ResultNotReady,
    OutputNotAvailable,
    QueueFull,
    StorageFull,
    Unavailable,
    DeliveryLimit,
    JobTimeout,
    EngineHung,
    ModelNotFound,
    DeadlineExceeded,
    Cancelled,
)
BY_CODE: dict[str, type[ServiceError]] = {cls.code: cls for cls in ERRORS}


def from_code(code: str, message: str) -> ServiceError:
    """Rebuild an error stored with a job (a worker's failure read back by the gateway)."""
    return BY_CODE.get(code, ServiceError)(message)
