"""The uploaded files as one Redis value: a small versioned container, zlib level 1 per member.

Why a format of our own and not zip/tar: the gateway must store a request in one round trip, the
worker must refuse a hostile or corrupted value *before* decompressing anything (total raw size is in
the header and checked against the limit first), and decompression must be bounded per member.

Layout (big-endian)::

    b"C2PP" | version u8 | count u32
    count x ( name_len u16 | name utf-8 | flags u8 | stored_len u64 | raw_len u64 | crc32(raw) u32 )
    the members' stored bytes, in the same order, nothing after them

Level 1 because the gateway packs on the request path and DICOM/NIfTI pixel data compresses about as
well at level 1 as at 6 for a fraction of the CPU. Members that barely compress (JPEG or JPEG 2000
pixel data, .nii.gz) are stored as they are, decided per file, so they cost neither CPU on the worker
nor a second copy in memory.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

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

_HEAD = struct.Struct(">4sBI")
_NAME_LEN = struct.Struct(">H")
_ENTRY = struct.Struct(">BQQI")
MAX_NAME_BYTES = 0xFFFF


class PayloadOverLimit(ValueError):
    """The files add up to more than the reader's limit once decompressed (a ValueError like the rest)."""


def _compress(data: bytes) -> bytes | None:
    """The zlib stream when it saves at least ``MIN_GAIN``, else None (store the member raw)."""
    if not data:
        return None
    if len(data) > PROBE_ABOVE:
        start = (len(data) - PROBE_BYTES) // 2
        probe = data[start : start + PROBE_BYTES]
        if len(zlib.compress(probe, LEVEL)) > (1 - PROBE_MIN_GAIN) * len(probe):
            return None
    packed = zlib.compress(data, LEVEL)
    return packed if len(packed) <= (1 - MIN_GAIN) * len(data) else None


def pack(files: Sequence[tuple[str, bytes]]) -> bytes:
    """One value for Redis holding every uploaded file, each compressed only if that pays."""
    header = [_HEAD.pack(MAGIC, VERSION, len(files))]
    bodies: list[bytes] = []
    for name, data in files:
        encoded = name.encode("utf-8")
        if len(encoded) > MAX_NAME_BYTES:
            raise ValueError(f"file name longer than {MAX_NAME_BYTES} bytes")
        raw = bytes(data)
        stored = _compress(raw)
        flags = FLAG_ZLIB if stored is not None else 0
        body = stored if stored is not None else raw
        header.append(_NAME_LEN.pack(len(encoded)) + encoded)
        header.append(_ENTRY.pack(flags, len(body), len(raw), zlib.crc32(raw)))
        bodies.append(body)
    return b"".join(header + bodies)


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


def unpack(blob: bytes, max_bytes: int) -> list[tuple[str, bytes]]:
    """The files of a packed value; ValueError for anything malformed or larger than ``max_bytes`` raw."""
    view = memoryview(blob)
    size = len(view)
    if size < _HEAD.size:
        raise ValueError(f"payload truncated: {size} bytes, shorter than its header")
    magic, version, count = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError("payload has a bad magic number: not a c2p payload")
    if version != VERSION:
        raise ValueError(f"payload version {version} is not supported (this build reads {VERSION})")
    if count * (_NAME_LEN.size + _ENTRY.size) > size - _HEAD.size:
        raise ValueError(f"payload truncated: {count} members cannot fit in {size} bytes")

    offset = _HEAD.size
    entries: list[tuple[str, int, int, int, int]] = []
    total_stored = total_raw = 0
    for index in range(count):
        if offset + _NAME_LEN.size > size:
            raise ValueError(f"payload truncated in the header of member {index}")
        (name_len,) = _NAME_LEN.unpack_from(view, offset)
        offset += _NAME_LEN.size
        if offset + name_len + _ENTRY.size > size:
            raise ValueError(f"payload truncated in the header of member {index}")
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
        entries.append((name, flags, stored_len, raw_len, crc))

    if offset + total_stored != size:
        what = "truncated" if offset + total_stored > size else "followed by unexpected bytes"
        raise ValueError(f"payload {what}: members declare {total_stored} bytes, {size - offset} are there")

    files: list[tuple[str, bytes]] = []
    for index, (name, flags, stored_len, raw_len, crc) in enumerate(entries):
        stored = view[offset : offset + stored_len]
        offset += stored_len
        data = _inflate(stored, raw_len, index) if flags & FLAG_ZLIB else bytes(stored)
        if zlib.crc32(data) != crc:
            raise ValueError(f"payload member {index} fails its CRC-32 check: the value is corrupted")
        files.append((name, data))
    return files
