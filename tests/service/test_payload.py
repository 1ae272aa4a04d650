"""The stored upload container: round trips, per-file compression choice, and refusal of bad values."""

from __future__ import annotations

import os
import struct
import zlib

import pytest

from service.queue.payload import FLAG_ZLIB, MAGIC, PayloadOverLimit, StreamPacker, pack, unpack

MIB = 1024 * 1024


def member_flags(blob: bytes) -> list[int]:
    """The flags byte of each member, read straight from the header."""
    count = struct.unpack_from(">I", blob, 5)[0]
    offset, flags = 9, []
    for _ in range(count):
        (name_len,) = struct.unpack_from(">H", blob, offset)
        offset += 2 + name_len
        flags.append(blob[offset])
        offset += 1 + 8 + 8 + 4
    return flags


def test_round_trip_keeps_names_order_and_bytes() -> None:
    files = [
        ("noise.bin", os.urandom(3 * MIB)),  # large and incompressible: the probe path
        ("small-noise.dcm", os.urandom(5000)),
        ("zeros.dcm", bytes(2 * MIB)),
        ("header.dcm", b"DICM" * 3000),
        ("empty", b""),
        ("série/ürün 画像.nii", b"\x00\x01" * 1000),
    ]
    blob = pack(files)
    assert blob.startswith(MAGIC)
    assert unpack(blob, max_bytes=10 * MIB) == files
    flags = member_flags(blob)
    assert [bool(f & FLAG_ZLIB) for f in flags] == [False, False, True, True, False, True]
    # incompressible members are stored as they are, the rest shrinks
    assert len(blob) < 3 * MIB + 5000 + 100_000


def test_no_files_and_exact_limit() -> None:
    assert unpack(pack([]), max_bytes=0) == []
    files = [("a", b"x" * 100), ("b", b"y" * 28)]
    assert unpack(pack(files), max_bytes=128) == files


def test_over_the_limit_is_refused_before_decompressing() -> None:
    blob = pack([("a", bytes(1000)), ("b", bytes(1000))])
    with pytest.raises(PayloadOverLimit, match="more than 1999 bytes"):
        unpack(blob, max_bytes=1999)
    assert isinstance(PayloadOverLimit("x"), ValueError)


def test_every_truncation_is_a_value_error() -> None:
    blob = pack([("a.dcm", b"abc" * 50), ("b", os.urandom(40)), ("c", b"")])
    for cut in range(len(blob)):
        with pytest.raises(ValueError):
            unpack(blob[:cut], max_bytes=MIB)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:4] + b"\x09" + b[5:], "version 9"),
        (lambda b: b + b"junk", "unexpected bytes"),
        (lambda b: b[:5] + struct.pack(">I", 10**9) + b[9:], "cannot fit"),
    ],
    ids=["magic", "version", "trailing", "count"],
)
def test_malformed_headers(mutate, message: str) -> None:
    blob = pack([("a", b"hello world" * 20)])
    with pytest.raises(ValueError, match=message):
        unpack(mutate(blob), max_bytes=MIB)


def one_member(name: bytes, flags: int, stored: bytes, raw_len: int, crc: int) -> bytes:
    return (
        MAGIC
        + struct.pack(">BI", 1, 1)
        + struct.pack(">H", len(name))
        + name
        + struct.pack(">BQQI", flags, len(stored), raw_len, crc)
        + stored
    )


def test_corrupted_members() -> None:
    raw = b"segment me " * 200
    packed = zlib.compress(raw, 1)
    good = one_member(b"a", FLAG_ZLIB, packed, len(raw), zlib.crc32(raw))
    assert unpack(good, MIB) == [("a", raw)]

    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(ValueError):
        unpack(one_member(b"a", FLAG_ZLIB, bytes(flipped), len(raw), zlib.crc32(raw)), MIB)
    with pytest.raises(ValueError, match="not a valid zlib stream"):
        unpack(one_member(b"a", FLAG_ZLIB, b"not zlib at all", len(raw), 0), MIB)
    with pytest.raises(ValueError, match="CRC-32"):
        unpack(one_member(b"a", 0, raw, len(raw), zlib.crc32(raw) ^ 1), MIB)
    with pytest.raises(ValueError, match="lengths differ"):
        unpack(one_member(b"a", 0, raw, len(raw) + 1, 0), MIB)
    with pytest.raises(ValueError, match="unknown flags"):
        unpack(one_member(b"a", 0x80, raw, len(raw), zlib.crc32(raw)), MIB)
    with pytest.raises(ValueError, match="not UTF-8"):
        unpack(one_member(b"\xff\xfe", 0, raw, len(raw), zlib.crc32(raw)), MIB)


def test_a_bomb_that_lies_about_its_size_is_cut_off() -> None:
    bomb = zlib.compress(bytes(50 * MIB), 9)  # ~50 KB that inflate to 50 MiB
    for declared in (0, 1000):
        with pytest.raises(ValueError, match="declared"):
            unpack(one_member(b"bomb", FLAG_ZLIB, bomb, declared, 0), max_bytes=MIB)


def test_names_too_long_are_refused_when_packing() -> None:
    with pytest.raises(ValueError, match="longer than"):
        pack([("x" * 70_000, b"")])


def test_stream_packer_writes_what_pack_writes_in_bounded_chunks() -> None:
    compressible = bytes(range(251)) * 12_000
    incompressible = os.urandom(2_500_000)
    files = [("a.dcm", b"small header" * 10), ("vol.nii", compressible), ("j2k.dcm", incompressible), ("e", b"")]
    packer = StreamPacker(files)
    chunks = list(packer.chunks(size=256 * 1024))
    blob = packer.header() + b"".join(chunks)
    assert len(packer.header()) == packer.header_size
    assert max(len(c) for c in chunks) <= 256 * 1024 + 64
    assert unpack(blob, max_bytes=10**8) == files
    assert unpack(pack(files), max_bytes=10**8) == files
    assert len(blob) < len(compressible) // 5 + len(incompressible) + 4096
