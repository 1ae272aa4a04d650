"""COCO run-length encoding: the compressed ``counts`` string that pycocotools reads.

Column-major runs starting with zeros, packed LEB128-style into ASCII 48..111 with each count stored
as the difference from the count two before (COCO's ``rleToString``). pycocotools packs in C; the
wrapper fixes the array layout it needs and makes the result JSON-ready (str, not bytes). Decoding
unpacks the runs here and expands them with numpy: it validates untrusted input on the way, and
pycocotools' decoder warns under numpy 2.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask


def encode(mask: np.ndarray) -> dict[str, object]:
    """A 2D mask (any dtype, nonzero = foreground) -> {"size": [h, w], "counts": str}."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D mask, got shape {mask.shape}")
    fortran = np.asfortranarray(mask != 0, dtype=np.uint8)
    rle = coco_mask.encode(fortran)
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict[str, object]) -> np.ndarray:
    """{"size", "counts"} -> uint8 mask [h, w] in {0, 1}; malformed input raises ValueError."""
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size)):
        raise ValueError("RLE 'size' must be [height, width] of non-negative integers")
    if not isinstance(counts, str) or not all(48 <= ord(c) <= 111 for c in counts):
        raise ValueError("RLE 'counts' must be a COCO compressed string (characters 48..111)")
    runs = _runs(counts)
    height, width = size
    if sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, size says {height * width}")
    flat = np.repeat((np.arange(len(runs)) % 2).astype(np.uint8), runs)
    return np.ascontiguousarray(flat.reshape(width, height).T)


def area(rle: dict[str, object]) -> int:
    """Foreground pixel count, straight from the runs (no decoding)."""
    return int(sum(_runs(str(rle["counts"]))[1::2]))


def _runs(counts: str) -> list[int]:
    """Unpack COCO's string into run lengths (the inverse of its rleToString), for validation and area."""
    runs: list[int] = []
    i = 0
    while i < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if i >= len(counts):
                raise ValueError("RLE 'counts' ends inside a number")
            c = ord(counts[i]) - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            i += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError("RLE 'counts' decodes to a negative run")
        runs.append(value)
    return runs
