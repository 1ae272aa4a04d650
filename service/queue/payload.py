"""The uploaded files as one Redis value: a small versioned container, zlib level 1 per member.

Why a format of our own and not zip/tar: the gateway must store a request in one round trip, the
worker must refuse a hostile or corrupted value *before* decompressing anything (total raw size is in
the header and checked against the limit first), and decompression must be bounded per member.

Layout (big-endian)::

    b"C2PP" | version u8 | count u32
    count x ( name_len u16 | name utf-8 | flags u8 | stored_len u64 | raw_len u64 | crc32(raw) u32 )
    the members' stored bytes, in the same order, nothing after them

Large members are compressed in chunks and, through ``StreamPacker``, written to Redis in chunks, so
the gateway never holds a second copy of a large upload.

Level 1 because the gateway packs on the request path and DICOM/NIfTI pixel data compresses about as
well at level 1 as at 6 for a fraction of the CPU. Members that barely compress (JPEG or JPEG 2000
pixel data, .nii.gz) are stored as they are, decided per file, so they cost neither CPU on the worker
nor a second copy in memory.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from service.inputs.spool import Data, pieces, whole

MAGIC = b"C2PP"
VERSION = 1
FLAG_ZLIB = 0x01
KNOWN_FLAGS = FLAG_ZLIB

LEVEL = 1
# Compress only when it saves at least this fraction of the member.
MIN_GAIN = 0.10
# Large members are probed on a slice first so a 500 MB JPEG series is not compressed just to be thrown away.
PROBE_ABOVE = 1024 * 1024
PROBE_BYTES = 256 * 1024
PROBE_MIN_GAIN = 0.05
# Members above PROBE_ABOVE are compressed and written in chunks of this size (bounded memory).
CHUNK_BYTES = 1024 * 1024

_HEAD = struct.Struct(">4sBI")
_NAME_LEN = struct.Struct(">H")
_ENTRY = struct.Struct(">BQQI")
MAX_NAME_BYTES = 0xFFFF


class PayloadOverLimit(ValueError):
    """The files add up to more than the reader's limit once decompressed (a ValueError like the rest)."""


def _worth_compressing(data: Data) -> bool:
    """Large members: decided on a sample from the middle (headers compress well, pixels may not)."""
    start = (len(data) - PROBE_BYTES) // 2
    probe = data[start : start + PROBE_BYTES]
    return len(zlib.compress(probe, LEVEL)) <= (1 - PROBE_MIN_GAIN) * len(probe)


def _compress(data: bytes) -> bytes | None:
    """The zlib stream when it saves at least ``MIN_GAIN``, else None (store the member raw)."""
    if not data:
        return None
    packed = zlib.compress(data, LEVEL)
    return packed if len(packed) <= (1 - MIN_GAIN) * len(data) else None


class StreamPacker:
    """``pack`` in pieces, for values too large to build twice in memory.

    The header's size is known before anything is compressed (names and fixed-size entries), so the
    writer reserves it, appends the members' stored bytes chunk by chunk, and writes the header last
    into the reserved space (Redis: SET placeholder, APPEND..., SETRANGE 0). The value is byte for
    byte what ``pack`` returns, so ``unpack`` reads both.
    """

    def __init__(self, files: Sequence[tuple[str, Data]]) -> None:
        self.files = files
        self.names = []
        for name, _ in files:
            encoded = name.encode("utf-8")
            if len(encoded) > MAX_NAME_BYTES:
                raise ValueError(f"file name longer than {MAX_NAME_BYTES} bytes")
            self.names.append(encoded)
        self.entries: list[bytes] = []

    @property
    def header_size(self) -> int:
        return _HEAD.size + sum(_NAME_LEN.size + len(n) + _ENTRY.size for n in self.names)

    def chunks(self, size: int = CHUNK_BYTES) -> Iterator[bytes | memoryview]:
        """The members' stored bytes, at most about ``size`` bytes per chunk. A member spooled to disk is read
        one chunk at a time, so packing never holds more than a chunk of it."""
        self.entries = []
        for (_, data), encoded in zip(self.files, self.names, strict=True):
            raw_len, crc, stored_len = len(data), 0, 0
            if raw_len <= PROBE_ABOVE:
                small = whole(data)
                crc = zlib.crc32(small)
                stored = _compress(small)
                flags = FLAG_ZLIB if stored is not None else 0
                body = stored if stored is not None else small
                stored_len = len(body)
                if body:
                    yield body
            else:
                flags = FLAG_ZLIB if _worth_compressing(data) else 0
                compressor = zlib.compressobj(LEVEL) if flags else None
                for piece in pieces(data, size):
                    crc = zlib.crc32(piece, crc)
                    out = compressor.compress(piece) if compressor is not None else piece
                    if out:
                        stored_len += len(out)
                        yield out
                if compressor is not None:
                    out = compressor.flush()
                    stored_len += len(out)
                    yield out
            self.entries.append(_NAME_LEN.pack(len(encoded)) + encoded + _ENTRY.pack(flags, stored_len, raw_len, crc))

    def header(self) -> bytes:
        """Valid once ``chunks`` has been consumed to the end."""
        if len(self.entries) != len(self.files):
            raise RuntimeError("header() before every member was packed")
        header = _HEAD.pack(MAGIC, VERSION, len(self.files)) + b"".join(self.entries)
        assert len(header) == self.header_size
        return header


def pack(files: Sequence[tuple[str, Data]]) -> bytes:
    """One value for Redis holding every uploaded file, each compressed only if that pays."""
    packer = StreamPacker(files)
    body = b"".join(packer.chunks())
    return packer.header() + body


def _inflate(stored: memoryview, raw_len: int, index: int) -> bytes:
    """Decompress one member to exactly ``raw_len`` bytes; the output is bounded whatever the input says."""
    inflater = zlib.decompressobj()
    try:
        # raw_len + 1 so that a stream longer than declared shows up instead of being cut silently,
        # and so that 0 (which zlib reads as "unbounded") can never be passed.
        out = inflater.decompress(stored, raw_len + 1)
    except zlib.error as exc:
        raise ValueError(f"payload member {index} is not a valid zlib stream: {exc}") from None
    if len(out) != raw_len or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise ValueError(f"payload member {index} does not decompress to its declared {raw_len} bytes")
    return out


@dataclass(frozen=True)
class Entry:
    """One member as the header declares it; ``offset`` is where its stored bytes start in the value."""

    index: int
    name: str
    flags: int
    offset: int
    stored_len: int
    raw_len: int
    crc: int


class HeaderIncomplete(ValueError):
    """The bytes given end inside the header: read at least ``needed`` bytes of the value and parse again."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"the header needs at least {needed} bytes")
        self.needed = needed


def read_index(head: bytes | memoryview, size: int, max_bytes: int) -> list[Entry]:
    """The members of a packed value of ``size`` bytes from its first bytes (``head``), without the rest.

    What a ranged reader needs (Redis GETRANGE): one member can then be fetched and inflated alone. ValueError
    for anything malformed or larger than ``max_bytes`` raw; HeaderIncomplete when ``head`` is too short.
    """
    view = memoryview(head)
    if size < _HEAD.size:
        raise ValueError(f"payload truncated: {size} bytes, shorter than its header")
    if len(view) < _HEAD.size:
        raise HeaderIncomplete(_HEAD.size)
    magic, version, count = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError("payload has a bad magic number: not a c2p payload")
    if version != VERSION:
        raise ValueError(f"payload version {version} is not supported (this build reads {VERSION})")
    if count * (_NAME_LEN.size + _ENTRY.size) > size - _HEAD.size:
        raise ValueError(f"payload truncated: {count} members cannot fit in {size} bytes")

    def need(end: int, index: int) -> None:
        if end > size:
            raise ValueError(f"payload truncated in the header of member {index}")
        if end > len(view):
            raise HeaderIncomplete(max(end, 2 * len(view)))

    offset = _HEAD.size
    declared: list[tuple[str, int, int, int, int]] = []
    total_stored = total_raw = 0
    for index in range(count):
        need(offset + _NAME_LEN.size, index)
        (name_len,) = _NAME_LEN.unpack_from(view, offset)
        offset += _NAME_LEN.size
        need(offset + name_len + _ENTRY.size, index)
        try:
            name = bytes(view[offset : offset + name_len]).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"payload member {index} has a name that is not UTF-8") from None
        offset += name_len
        flags, stored_len, raw_len, crc = _ENTRY.unpack_from(view, offset)
        offset += _ENTRY.size
        if flags & ~KNOWN_FLAGS:
            raise ValueError(f"payload member {index} has unknown flags {flags:#x}")
        if not flags & FLAG_ZLIB and stored_len != raw_len:
            raise ValueError(f"payload member {index} is stored raw but its lengths differ")
        total_stored += stored_len
        total_raw += raw_len
        if total_raw > max_bytes:
            raise PayloadOverLimit(f"payload holds more than {max_bytes} bytes once decompressed")
        declared.append((name, flags, stored_len, raw_len, crc))

    if offset + total_stored != size:
        what = "truncated" if offset + total_stored > size else "followed by unexpected bytes"
        raise ValueError(f"payload {what}: members declare {total_stored} bytes, {size - offset} are there")
    entries = []
    for index, (name, flags, stored_len, raw_len, crc) in enumerate(declared):
        entries.append(Entry(index, name, flags, offset, stored_len, raw_len, crc))
        offset += stored_len
    return entries


def extract(entry: Entry, stored: bytes | memoryview) -> bytes:
    """One member's bytes from its stored bytes, inflated within its declared size and checked by CRC."""
    if len(stored) != entry.stored_len:
        raise ValueError(f"payload member {entry.index}: {len(stored)} stored bytes, {entry.stored_len} declared")
    data = _inflate(memoryview(stored), entry.raw_len, entry.index) if entry.flags & FLAG_ZLIB else bytes(stored)
    if zlib.crc32(data) != entry.crc:
        raise ValueError(f"payload member {entry.index} fails its CRC-32 check: the value is corrupted")
    return data


def unpack(blob: bytes, max_bytes: int) -> list[tuple[str, bytes]]:
    """The files of a packed value; ValueError for anything malformed or larger than ``max_bytes`` raw."""
    view = memoryview(blob)
    entries = read_index(view, len(view), max_bytes)
    return [(e.name, extract(e, view[e.offset : e.offset + e.stored_len])) for e in entries]
