"""Reading a multipart upload with every limit enforced while the bytes arrive, not after.

``Content-Length`` is checked before the body is read; a chunked body is counted as it streams and cut
off at the limit, so no client can make the gateway buffer more than ``max_upload_bytes``. Starlette's
form parser spools large parts to temporary files; the parts are read back one by one.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import LimitSettings
from service.errors import ImageTooLarge, InvalidRequest, PayloadTooLarge
from service.inputs import Upload

FIELD = "file"
UPLOAD_PATHS = ("/v1/segmentations", "/v2/models/", "/dicomweb/")


class BodyLimit:
    """ASGI middleware: refuse or cut off request bodies over the limit on upload routes."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].startswith(UPLOAD_PATHS):
            await self.app(scope, receive, send)
            return
        received = 0
        limit = self.max_bytes

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)


def declared_length(request: Request, max_bytes: int) -> None:
    value = request.headers.get("content-length")
    if value is None:
        return
    try:
        length = int(value)
    except ValueError as err:
        raise InvalidRequest("Content-Length is not a number") from err
    if length > max_bytes:
        raise PayloadTooLarge(f"upload of {length} bytes exceeds the limit of {max_bytes} bytes")


async def read_files(request: Request, limits: LimitSettings) -> list[Upload]:
    """The ``file`` parts of a multipart/form-data request, as (filename, bytes), in upload order."""
    declared_length(request, limits.max_upload_bytes)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest("send the image as multipart/form-data with one or more parts named 'file'")
    # Allow one part more than the limit so "too many files" is reported as such, not as a parser error.
    async with request.form(max_files=limits.max_files + 1, max_fields=100) as form:
        parts = form.getlist(FIELD)
        if not parts:
            raise InvalidRequest("no part named 'file' in the upload")
        if len(parts) > limits.max_files:
            raise ImageTooLarge(f"{len(parts)} files in one request; the limit is {limits.max_files}")
        files = []
        for part in parts:
            if not isinstance(part, UploadFile):
                raise InvalidRequest("the 'file' field must be a file part, not a text field")
            files.append((part.filename or "", await part.read()))
    return files
