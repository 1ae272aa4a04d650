"""PNG and JPEG pictures (endoscopy, dermoscopy, photographs, exported X-rays) through Pillow.

Pillow opens lazily: the size is known from the header, so it is checked against the limits before ``load`` decodes
a pixel. Only the sniffed format's plugin is allowed to open the bytes, and Pillow's process-wide settings are left
alone (the service's own limits do the bomb check).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps

from service.config import LimitSettings
from service.errors import ImageTooLarge, InvalidImage, ServiceError
from service.inputs.sniff import quiet
from service.inputs.volume import Format, InputHeader, Member, Volume, storage_dtype

_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG"}


@contextmanager
def _opened(member: Member, fmt: Format, limits: LimitSettings) -> Iterator[Image.Image]:
    """The lazily opened picture, its size checked; Pillow's errors become the service's."""
    what = member.label
    try:
        with quiet(), Image.open(member.open(), formats=[_PIL_FORMAT[fmt]]) as picture:
            width, height = picture.size
            if width <= 0 or height <= 0:
                raise InvalidImage(f"{what}: the picture has no pixels")
            most = min(limits.max_pixels_per_slice, limits.max_voxels)
            if width * height > most:
                raise ImageTooLarge(f"{what}: {height} x {width} pixels, the limit is {most}")
            yield picture
    except ServiceError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{what}: declares more pixels than the limit") from exc
    except Exception as exc:  # truncated data, bad chunks, CRC errors: Pillow raises OSError, SyntaxError, ValueError
        raise InvalidImage(f"{what}: not a readable {fmt.upper()} ({type(exc).__name__})") from exc


# EXIF orientations that turn the picture a quarter: it is displayed (and segmented) with width and height swapped.
_QUARTER_TURNS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


def _exif_orientation(picture: Image.Image) -> int:
    try:
        return int(picture.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block: the picture as stored
        return 1


def probe(member: Member, fmt: Format, limits: LimitSettings, modality_hint: str | None) -> InputHeader:
    with _opened(member, fmt, limits) as picture:
        width, height = picture.size
        if _exif_orientation(picture) in _QUARTER_TURNS:
            width, height = height, width
        channels = 1 if picture.mode in _GREY_MODES else 3
    return InputHeader(fmt, modality_hint, (1, height, width), channels, 1, None)


def _pixels(picture: Image.Image) -> np.ndarray:
    """[Y, X] grey in its own depth or [Y, X, 3] uint8 RGB; alpha is dropped, palettes and CMYK become RGB."""
    mode = picture.mode
    if mode in ("1", "LA", "La"):
        return np.asarray(picture.convert("L"))
    if mode == "L":
        return np.asarray(picture)
    if mode.startswith("I;16"):
        return np.asarray(picture).astype(np.uint16)  # native byte order whatever the file's
    if mode == "I":
        values = np.asarray(picture)
        target = storage_dtype(int(values.min()), int(values.max()))
        return values.astype(target)
    if mode == "F":
        return np.asarray(picture, dtype=np.float32)
    return np.asarray(picture.convert("RGB"))


def decode(member: Member, fmt: Format, limits: LimitSettings, modality_hint: str | None) -> Volume:
    """The picture as a viewer displays it: a photograph's EXIF orientation is applied, so the mask lines up with
    what a reader sees (a phone's dermoscopy photo is often stored sideways)."""
    with _opened(member, fmt, limits) as picture:
        picture.load()
        if _exif_orientation(picture) != 1:
            try:
                picture = ImageOps.exif_transpose(picture)
            except Exception as exc:
                raise InvalidImage(f"{member.label}: its EXIF orientation cannot be applied") from exc
        pixels = _pixels(picture)
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise InvalidImage(f"{member.label}: pixels that are not finite")
    # np.asarray over a Pillow image is a read-only view; the volume owns writable pixels like every other reader's.
    return Volume(pixels=np.array(pixels[None], order="C"), format=fmt, modality=modality_hint)
