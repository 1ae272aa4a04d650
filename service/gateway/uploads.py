"""Reading a multipart upload with every limit enforced while the bytes arrive, not after.

``Content-Length`` is checked before the body is read; a chunked body is counted as it streams and cut
off at the limit, so no client can make the gateway buffer more than ``max_upload_bytes``. Parts are kept by
service/gateway/multipart.py: a few MiB in memory, the rest in temporary files (``TMPDIR``) that the probe and the
packer read by ranges, so a 150 MB volume or series costs the gateway its chunks, not its size. At most
``limits.max_concurrent_uploads`` uploads are read at once (memory and spool disk both scale with it); past it
an upload is refused at once with 503 and Retry-After, before its body is read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import LimitSettings
from service.errors import ImageTooLarge, InvalidRequest, PayloadTooLarge, UploadsBusy
from service.gateway import multipart
from service.gateway.identity import error_headers
from service.inputs import Upload

FIELD = "file"
MAX_OTHER_FIELDS = 100  # form fields beside the files a request may carry (ignored)
UPLOAD_PATHS = ("/v1/segmentations", "/v2/models/", "/dicomweb/")


class BodyLimit:
    """ASGI middleware: refuse or cut off request bodies over the limit on upload routes, and refuse uploads past
    the number allowed in progress at once."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_concurrent: int, retry_after_s: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_concurrent = max_concurrent
        self.retry_after_s = retry_after_s
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope["path"].startswith(UPLOAD_PATHS):
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.max_concurrent:
            busy = UploadsBusy(
                f"{self.max_concurrent} uploads are in progress, the most this gateway reads at once; "
                f"retry in {self.retry_after_s} s",
                self.retry_after_s,
            )
            body = {"error": busy.message, **busy.body()}  # both error shapes (/v1's and the v2 protocol's)
            await JSONResponse(body, busy.http_status, headers=error_headers(busy))(scope, receive, send)
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

        self.in_progress += 1
        try:
            await self.app(scope, counted, send)
        finally:
            self.in_progress -= 1


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


@asynccontextmanager
async def received_files(request: Request, limits: LimitSettings) -> AsyncIterator[list[Upload]]:
    """The ``file`` parts of a multipart/form-data request, in upload order, valid inside the block: parts on disk
    are ``Spooled`` files, deleted when it ends (submit them inside it). Other fields are allowed and ignored."""
    declared_length(request, limits.max_upload_bytes)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise InvalidRequest("send the image as multipart/form-data with one or more parts named 'file'")
    boundary = multipart.boundary_of(content_type, "multipart/form-data")
    most = limits.max_files + MAX_OTHER_FIELDS
    too_many = f"more than {most} parts in one request; the limit is {limits.max_files} files"
    async with multipart.received_parts(request, boundary, limits.max_upload_bytes, most, too_many) as parts:
        files: list[Upload] = []
        for part in parts:
            name, filename = part.disposition()
            if name != FIELD:
                continue
            if filename is None:
                raise InvalidRequest("the 'file' field must be a file part, not a text field")
            files.append((filename, part.data))
        if not files:
            raise InvalidRequest("no part named 'file' in the upload")
        if len(files) > limits.max_files:
            raise ImageTooLarge(f"{len(files)} files in one request; the limit is {limits.max_files}")
        yield files
