"""An uploaded file the gateway keeps on disk and reads by ranges, so a 150 MB volume never sits in its memory.

Why not the bytes: the gateway only ever needs a file's first bytes (what it is, its header), one pass for the
upload's digest and one pass to pack it into Redis; holding it whole for that costs its size in RSS per upload in
progress. Why not mmap: pages read through a mapping count towards the process's RSS until unmapped, reads with
``pread`` go through the page cache, which the kernel owns and reclaims.

``Data`` is what an upload's file may be on the gateway: bytes (small parts, gRPC messages, zip members) or a
``Spooled`` file. ``opener``, ``pieces`` and ``whole`` read either, so the input readers need not care which.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import BinaryIO

CHUNK_BYTES = 1024 * 1024


class Spooled:
    """A read-only view of an open file (the multipart parser's spool): ``len``, slices read with ``pread``,
    and any number of independent readers from ``open``. The file stays owned by whoever opened it."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file  # kept so the descriptor outlives no reference to it
        file.flush()  # what the writer's buffer still holds must be in the file for pread and fstat
        self._fd = file.fileno()
        self.size = os.fstat(self._fd).st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> bytes:
        if not isinstance(key, slice):
            raise TypeError("a spooled upload is read by slices")
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise ValueError("a spooled upload is read by contiguous slices")
        return self.read_at(start, max(0, stop - start))

    def read_at(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` (fewer at the end of the file)."""
        pieces = []
        while size > 0:
            piece = os.pread(self._fd, size, offset)
            if not piece:
                break
            pieces.append(piece)
            offset += len(piece)
            size -= len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def open(self) -> BinaryIO:
        """A reader with its own position (several may read at once: zipfile opens members this way). Not an
        ``io.BufferedReader``: pydicom takes one of those for a named file and reopens it by name."""
        return _Reader(self)  # type: ignore[return-value]

    def chunks(self, size: int = CHUNK_BYTES) -> Iterator[bytes]:
        for offset in range(0, self.size, size):
            yield self.read_at(offset, size)


class _Reader(io.RawIOBase):
    """Reads through a window of ``WINDOW`` bytes, so a header parsed element by element costs a few ``pread``s."""

    WINDOW = 64 * 1024

    def __init__(self, spooled: Spooled) -> None:
        self._spooled = spooled
        self._pos = 0
        self._window_at = 0
        self._window = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._spooled.size - self._pos)
        start = self._pos - self._window_at
        if start >= 0 and start + size <= len(self._window):
            data = self._window[start : start + size]
        elif size < self.WINDOW:
            self._window_at, self._window = self._pos, self._spooled.read_at(self._pos, self.WINDOW)
            data = self._window[:size]
        else:
            data = self._spooled.read_at(self._pos, size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._spooled.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


Data = bytes | Spooled


def opener(data: Data) -> BinaryIO:
    """A stream over ``data`` from its start; no copy of a spooled file."""
    return data.open() if isinstance(data, Spooled) else io.BytesIO(data)


def pieces(data: Data, size: int = CHUNK_BYTES) -> Iterator[bytes | memoryview]:
    """``data`` in pieces of at most ``size`` bytes, in order (views, not copies, of bytes)."""
    if isinstance(data, Spooled):
        yield from data.chunks(size)
        return
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield view[start : start + size]


def whole(data: Data) -> bytes:
    """All of ``data`` as bytes: only where a reader needs the file at once (the worker's decoders, small files)."""
    return data[:] if isinstance(data, Spooled) else data
