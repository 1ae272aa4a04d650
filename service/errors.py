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


ERRORS: tuple[type[ServiceError], ...] = (ServiceError, ArtifactNotFound, ArtifactInvalid, InvalidTensor)
