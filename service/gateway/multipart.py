"""Multipart bodies read as they stream, every part kept where it costs least: one parser for REST's
multipart/form-data and STOW-RS's multipart/related.

Why our own loop over python-multipart and not Starlette's form parser: that one keeps every part under 1 MiB in
memory, so a 300-slice CT series sent as 300 parts of 0.5 MB sits whole in the gateway (150 MB) while it is probed
and queued. Here a request holds at most ``IN_MEMORY_BYTES`` of parts in memory; past it, and for any part over
``SPOOL_ABOVE``, parts go to a temporary file (``TMPDIR``) that the probe and the packer read by ranges
(service/inputs/spool.py). The byte limit is applied to the whole body as it arrives.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.errors import ImageTooLarge, InvalidRequest, PayloadTooLarge
from service.inputs.spool import Data, Spooled

SPOOL_ABOVE = 1024 * 1024  # a part larger than this is always on disk
IN_MEMORY_BYTES = 4 * 1024 * 1024  # parts of one request kept in memory, at most, before later ones go to disk


@dataclass
class Part:
    """One part as it arrived: its headers (names lower-case) and its bytes, in memory or on disk."""

    headers: dict[str, str] = field(default_factory=dict)
    file: tempfile.SpooledTemporaryFile = field(
        default_factory=lambda: tempfile.SpooledTemporaryFile(0),  # noqa: SIM115 - closed by received_parts
        repr=False,
    )
    size: int = 0
    on_disk: bool = False

    @property
    def data(self) -> Data:
        """A ``Spooled`` view of the file when on disk (valid while the request is handled), else its bytes."""
        if self.on_disk:
            return Spooled(self.file)  # type: ignore[arg-type]
        self.file.seek(0)
        return self.file.read()

    def disposition(self) -> tuple[str, str | None]:
        """(name, filename) of a form-data part; filename None for a text field."""
        _, options = parse_options_header(self.headers.get("content-disposition", ""))
        name, filename = options.get(b"name"), options.get(b"filename")
        return (name or b"").decode("latin-1"), None if filename is None else filename.decode("utf-8", "replace")


def boundary_of(content_type: str, media: str) -> bytes:
    """The boundary of a ``media`` (multipart/...) Content-Type; InvalidRequest when it has none."""
    given, options = parse_options_header(content_type)
    if given.decode("latin-1") != media:
        raise InvalidRequest(f"expected a {media} body, not {given.decode('latin-1')!r}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequest(f"the {media} Content-Type has no boundary")
    return boundary.strip(b'"')


@asynccontextmanager
async def received_parts(
    request: Request, boundary: bytes, max_bytes: int, max_parts: int, too_many: str
) -> AsyncIterator[list[Part]]:
    """The parts of the streamed body (at most ``max_parts``, else ImageTooLarge with ``too_many``), valid inside
    the block: their files are closed, a spool deleted, when it ends."""
    parts: list[Part] = []
    try:
        await _read(request, boundary, max_bytes, max_parts, too_many, parts)
        yield parts
    finally:
        for part in parts:
            part.file.close()


async def _read(
    request: Request, boundary: bytes, max_bytes: int, max_parts: int, too_many: str, parts: list[Part]
) -> None:
    header_field = bytearray()
    header_value = bytearray()
    received = 0
    in_memory = 0

    def begin() -> None:
        if len(parts) >= max_parts:
            raise ImageTooLarge(too_many)
        parts.append(Part())

    def data(buffer: bytes, start: int, end: int) -> None:
        nonlocal in_memory
        part = parts[-1]
        part.file.write(buffer[start:end])
        part.size += end - start
        if not part.on_disk:
            in_memory += end - start
            if part.size > SPOOL_ABOVE or in_memory > IN_MEMORY_BYTES:
                part.file.rollover()
                part.on_disk = True
                in_memory -= part.size

    def field_(buffer: bytes, start: int, end: int) -> None:
        header_field.extend(buffer[start:end])

    def value(buffer: bytes, start: int, end: int) -> None:
        header_value.extend(buffer[start:end])

    def header_end() -> None:
        parts[-1].headers[header_field.decode("latin-1").lower()] = header_value.decode("latin-1").strip()
        header_field.clear()
        header_value.clear()

    try:
        # The constructor checks the boundary too (longer than python-multipart takes: a 400, not a 500)
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": begin,
                "on_part_data": data,
                "on_header_field": field_,
                "on_header_value": value,
                "on_header_end": header_end,
            },
        )
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise PayloadTooLarge(f"upload exceeds the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise InvalidRequest(f"the multipart body is malformed: {exc}") from exc
