"""One DICOM file's pixel data decoded into the output volume: grey values in rescaled units, colour and palettes as
8-bit RGB.

Decoding is where untrusted data meets native code, so it is guarded here: compressed frames whose codestream
declares other dimensions than the header (which the limits checked) are refused before a decoder sizes its output
from them, and the plugins are tried pylibjpeg's first, Pillow's and pydicom's next, GDCM only for syntaxes none of
them decodes (it crashes the process on some corrupt data instead of raising). Values are stored as integers whenever
the rescale is integral, and MONOCHROME1 is inverted (declared max + min - value), so bright means dense everywhere
downstream.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder, iter_pixels, pixel_array
from pydicom.uid import UID

from service.errors import InvalidImage, ServiceError
from service.inputs.dicom.headers import Header
from service.inputs.sniff import quiet
from service.inputs.volume import storage_dtype
from service.outputs.dicom_headers import header_only

SAFE_PLUGINS = ("pylibjpeg", "pydicom", "pillow")  # in order of preference


class GreyStore:
    """The output volume for grey series. Integral rescales are stored as integers; the dtype comes from the declared
    range when that fits 16 bits, and otherwise (signed 16-bit CT with intercept -1024 is common) starts at 16 bits
    and widens only if the actual values need it (slices arrive out of order, so the range put so far is tracked)."""

    def __init__(self, headers: list[Header], shape: tuple[int, int, int]) -> None:
        # The rescaled range the headers allow: the clip for integers, the mirror for MONOCHROME1 and its window.
        self.declared: tuple[float, float] | None = None
        if not any(h.float_pixels or h.modality_lut for h in headers):
            ends = [s * v + b for h in headers for (s, b) in set(h.rescale) for v in h.stored_range()]
            self.declared = (min(ends), max(ends))
        integral = self.declared is not None and all(
            float(v).is_integer() for h in headers for r in h.rescale for v in r
        )
        dtype = storage_dtype(*self.declared) if integral and self.declared else np.dtype(np.float32)
        if integral and self.declared and dtype.kind == "f":
            dtype = np.dtype(np.int16 if self.declared[0] < 0 else np.uint16)
        self.pixels = np.empty(shape, dtype)
        self.seen: tuple[int, int] | None = None

    def put(self, z: int, values: np.ndarray) -> None:
        if self.pixels.dtype.kind != "f":
            lo, hi = int(values.min()), int(values.max())
            self.seen = (lo, hi) if self.seen is None else (min(lo, self.seen[0]), max(hi, self.seen[1]))
            info = np.iinfo(self.pixels.dtype)
            if lo < info.min or hi > info.max:
                self.pixels = self.pixels.astype(storage_dtype(*self.seen))
        self.pixels[z] = values


def _grey_values(frame: np.ndarray, ds: Dataset, h: Header, index: int, store: GreyStore) -> np.ndarray:
    """One frame in rescaled units, MONOCHROME1 inverted within the declared range (so the window can be mirrored
    the same way)."""
    if h.modality_lut:
        values = np.asarray(apply_modality_lut(frame, ds), dtype=np.float32)
    elif store.pixels.dtype.kind != "f":
        slope, intercept = h.rescale[index]
        values = frame.astype(np.int64) * int(slope) + int(intercept)
        if store.declared:
            np.clip(values, int(store.declared[0]), int(store.declared[1]), out=values)
    else:
        slope, intercept = h.rescale[index]
        values = frame.astype(np.float32)
        if slope != 1 or intercept != 0:
            values = (frame.astype(np.float64) * slope + intercept).astype(np.float32)
    if h.photometric == "MONOCHROME1":
        lo, hi = store.declared if store.declared else (float(values.min()), float(values.max()))
        values = (int(lo + hi) if values.dtype.kind == "i" else np.float32(lo + hi)) - values
    return values


def _colour_values(frame: np.ndarray, ds: Dataset, h: Header) -> np.ndarray:
    """One frame as 8-bit RGB: palettes looked up, deeper samples shifted down (YBR is already RGB: pydicom
    converts it while decoding)."""
    if h.photometric == "PALETTE COLOR":
        frame = apply_color_lut(frame, ds)
        bits = 16 if frame.dtype.itemsize > 1 else 8
    else:
        bits = h.bits_stored
    if frame.dtype.itemsize > 1 or bits > 8:
        frame = np.right_shift(frame, max(bits - 8, 0)) if frame.dtype.kind in "ui" else frame
        frame = np.clip(frame, 0, 255)
    return frame.astype(np.uint8)


def _read_full(h: Header) -> Dataset:
    data = h.member.read()
    ds = dcmread(io.BytesIO(data), force=True)
    if not ds.file_meta.get("TransferSyntaxUID"):
        ds.file_meta.TransferSyntaxUID = UID(h.transfer_syntax)
    return ds


_JPEG_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}  # JPEG process 1-15 and JPEG-LS frame headers
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}
_SIZED_CODECS = (
    "1.2.840.10008.1.2.4.5",
    "1.2.840.10008.1.2.4.6",
    "1.2.840.10008.1.2.4.7",
    "1.2.840.10008.1.2.4.8",
    "1.2.840.10008.1.2.4.9",
    "1.2.840.10008.1.2.4.20",
)  # JPEG, JPEG-LS, JPEG 2000, HTJ2K


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    """(columns, rows, components) from a JPEG or JPEG-LS frame header."""
    if frame[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF or marker in _STANDALONE:
            pos += 1 if marker == 0xFF else 2
            continue
        if marker in _JPEG_SOF:
            if pos + 10 > len(frame):
                return None
            rows, columns = (
                int.from_bytes(frame[pos + 5 : pos + 7], "big"),
                int.from_bytes(frame[pos + 7 : pos + 9], "big"),
            )
            return columns, rows, frame[pos + 9]
        if marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            return None
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    return None


def _j2k_size(frame: bytes) -> tuple[int, int, int] | None:
    """(columns, rows, components) from a JPEG 2000 codestream's SIZ segment, inside a JP2 file or bare."""
    pos = 0
    if frame[4:8] == b"jP  ":  # JP2 boxes: find the contiguous codestream box
        while pos + 8 <= len(frame):
            length = int.from_bytes(frame[pos : pos + 4], "big")
            if frame[pos + 4 : pos + 8] == b"jp2c":
                pos += 8
                break
            if length < 8:
                return None
            pos += length
    if frame[pos : pos + 4] != b"\xff\x4f\xff\x51" or pos + 42 > len(frame):
        return None
    siz = pos + 2

    def word(offset: int) -> int:
        return int.from_bytes(frame[siz + offset : siz + offset + 4], "big")

    return word(6) - word(14), word(10) - word(18), int.from_bytes(frame[siz + 38 : siz + 40], "big")


def _check_codestreams(ds: Dataset, h: Header) -> None:
    """JPEG, JPEG-LS and JPEG 2000 decoders size their output from the codestream, not from the DICOM header that
    the limits checked; a frame whose codestream declares other dimensions is refused before it is decoded."""
    if not h.transfer_syntax.startswith(_SIZED_CODECS):
        return
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    frames = generate_frames(ds.PixelData, number_of_frames=h.frames, extended_offsets=offsets)
    expected = (h.columns, h.rows, h.samples)
    for index, frame in zip(range(h.frames), frames, strict=False):
        size = _jpeg_size(frame) if frame[:2] == b"\xff\xd8" else _j2k_size(frame)
        if size != expected:
            raise InvalidImage(
                f"{h.label}: frame {index + 1}'s compressed data does not declare the header's "
                f"{h.rows} x {h.columns} x {h.samples} pixels"
            )


def _plugins(ts: str) -> list[str]:
    """Decoding plugins in the order tried. pydicom would try GDCM first, and GDCM crashes the process (segfault,
    abort) on some corrupt data where pylibjpeg, Pillow and pydicom raise; so GDCM only decodes syntaxes none of
    those handles."""
    available = list(get_decoder(UID(ts)).available_plugins)
    return [p for p in SAFE_PLUGINS if p in available] or available or [""]


def _decoded(ds: Dataset, h: Header) -> Iterator[np.ndarray]:
    """Frames one at a time, from the first plugin that decodes the file. Within a plugin, pydicom's frame iterator
    fails on a few files its indexed path reads (a J2K codestream whose signedness disagrees with
    PixelRepresentation), so that is the second try."""
    failure: BaseException | None = None
    for plugin in _plugins(h.transfer_syntax):
        for by_index in (False, True):
            produced = 0
            try:
                if by_index:
                    for index in range(h.frames):
                        yield pixel_array(ds, index=index, decoding_plugin=plugin)
                        produced += 1
                else:
                    for frame in iter_pixels(ds, decoding_plugin=plugin):
                        yield frame
                        produced += 1
                return
            except BaseException as exc:
                if produced or isinstance(exc, ServiceError) or not _decoder_failed(exc):
                    raise
                failure = exc
    assert failure is not None
    raise failure


def _frames(ds: Dataset, h: Header) -> Iterator[np.ndarray]:
    """The decoded frames of one file, each checked against the header's shape."""
    _check_codestreams(ds, h)
    expected = (h.rows, h.columns, 3) if h.samples == 3 else (h.rows, h.columns)
    count = 0
    for frame in _decoded(ds, h):
        if count >= h.frames or frame.shape != expected:
            raise InvalidImage(f"{h.label}: the decoded pixel data does not match the header's shape")
        count += 1
        yield frame
    if count != h.frames:
        raise InvalidImage(f"{h.label}: {count} frames decoded, {h.frames} declared")


def _decoder_failed(exc: BaseException) -> bool:
    """Whether an exception is a decoder rejecting its input. The Rust plugins (pylibjpeg-rle) panic on some corrupt
    data, and pyo3's PanicException derives from BaseException, so ``except Exception`` alone would let it through."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def decode_file(
    h: Header, index: int, slot: dict[tuple[int, int], int], rgb: np.ndarray | None, grey: GreyStore | None
) -> Dataset:
    """File ``index`` of the series read in full, its frames decoded into their slices (``slot[(index, frame)]``) of
    ``rgb`` or ``grey``; returns its header without pixels. What a decoder raises becomes InvalidImage naming the
    file."""
    try:
        with quiet():
            ds = _read_full(h)
            for f, frame in enumerate(_frames(ds, h)):
                if rgb is not None:
                    rgb[slot[(index, f)]] = _colour_values(frame, ds, h)
                else:
                    grey.put(slot[(index, f)], _grey_values(frame, ds, h, f, grey))  # type: ignore[union-attr]
            return header_only(ds)
    except BaseException as exc:
        if isinstance(exc, ServiceError) or not _decoder_failed(exc):
            raise
        name = UID(h.transfer_syntax).name
        raise InvalidImage(f"{h.label}: the pixel data cannot be decoded ({name}, {type(exc).__name__})") from exc
