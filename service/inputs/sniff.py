"""The front door for untrusted bytes: what an upload is (by content; names and extensions lie), the members of a
zip, and decompression that stops at a limit.

Everything here is cheap and runs on the gateway before a pixel is decoded. Compressed containers are the classic
way to make a small request expensive, so sizes are checked from the container's own declarations first (zip central
directory, NIfTI header) and inflating never produces more bytes than were asked for.
"""

from __future__ import annotations

import re
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO, Literal

from service.config import LimitSettings
from service.errors import ImageTooLarge, InvalidImage, PayloadTooLarge, UnsupportedFormat
from service.inputs.spool import Data, opener, whole
from service.inputs.volume import Format, Kind, Member, Upload

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or the end record of an empty archive
GZIP_MAGIC = b"\x1f\x8b"
NPY_MAGIC = b"\x93NUMPY"  # a NumPy .npy tensor (service.inputs.tensor)
NIFTI_HEAD = 544  # enough for either NIfTI header (348 or 540 bytes) and NIfTI-1's 4 extension flag bytes
_CHUNK = 1 << 16
# Compressed bytes read to inflate a gzip'd NIfTI's header: its gzip header (a file name at most) and 544 bytes.
GZIP_HEAD_BYTES = _CHUNK
_GZIP_WBITS = 16 + zlib.MAX_WBITS
# Zip members that are never part of a series: folders, macOS resource forks, hidden files, the media directory.
_SKIPPED_MEMBER = re.compile(r"(^|/)(__MACOSX/|\.[^/]*$|DICOMDIR$)", re.IGNORECASE)
# Warnings from the decoders describe header quirks of untrusted files, quoting their values (patient data
# included); they are neither actionable nor safe to log. Matching by module keeps a filter that leaks out of
# catch_warnings (it is process-global, and decoding runs in threads) harmless.
_QUIET_MODULES = r"(pydicom|nibabel|PIL|service\.inputs)(\.|$)"


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the decoders' warnings for the duration of a read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=_QUIET_MODULES)
        yield


def label(index: int, name: str) -> str:
    """How messages name an upload: its 1-based position only. File names are chosen by whoever exported the study,
    and PACS exports are often named after the patient or the record number; messages reach logs, job records and
    other systems, so they never quote a name (``name`` is accepted so callers need not know that)."""
    del name
    return f"file {index}"


# ---------------------------------------------------------------------------------------------- inflating


def _inflate_chunks(data: bytes | memoryview, wbits: int, limit: int) -> Iterator[bytes]:
    """Decompressed pieces, never more than ``limit`` bytes in all. Concatenated gzip members are followed, as gzip
    itself does. Stops silently at the limit or the end of input; callers compare what they got with what they need.
    """
    view = memoryview(data)
    pos = 0
    left = limit
    engine = zlib.decompressobj(wbits)
    while left > 0:
        if engine.unconsumed_tail:
            chunk: bytes | memoryview = engine.unconsumed_tail
        elif pos < len(view):
            chunk = view[pos : pos + _CHUNK]
            pos += len(chunk)
        else:
            return
        piece = engine.decompress(chunk, left)
        left -= len(piece)
        if piece:
            yield piece
        if engine.eof:
            rest = engine.unused_data + bytes(view[pos:])
            if wbits != _GZIP_WBITS or not rest.startswith(GZIP_MAGIC):
                return
            view, pos, engine = memoryview(rest), 0, zlib.decompressobj(wbits)


def gunzip_prefix(data: bytes, size: int, what: str) -> bytearray:
    """The first ``size`` bytes of a gzip stream (fewer if it ends first), in one writable buffer."""
    out = bytearray(size)
    filled = 0
    try:
        for piece in _inflate_chunks(data, _GZIP_WBITS, size):
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
    except zlib.error as exc:
        raise InvalidImage(f"{what}: corrupt gzip stream") from exc
    del out[filled:]
    return out


def inflated_size(data: bytes | memoryview, limit: int, what: str) -> int:
    """How many bytes a raw deflate stream expands to, counting no further than ``limit + 1``."""
    try:
        return sum(len(piece) for piece in _inflate_chunks(data, -zlib.MAX_WBITS, limit + 1))
    except zlib.error as exc:
        raise InvalidImage(f"{what}: corrupt deflate stream") from exc


# ------------------------------------------------------------------------------------------------ sniffing


def nifti_version(head: bytes) -> int | None:
    """1 or 2 for a single-file NIfTI header (either byte order), else None. Header/image pairs are refused: their
    pixels are in another file."""
    for order in ("little", "big"):
        size = int.from_bytes(head[:4], order)  # type: ignore[arg-type]
        if size == 348 and len(head) >= 348:
            magic = head[344:348]
            if magic == b"n+1\x00":
                return 1
            if magic == b"ni1\x00":
                raise UnsupportedFormat("NIfTI header/image pairs (.hdr + .img) are not supported; send one .nii")
        if size == 540 and head[4:8] == b"n+2\x00":
            return 2
        if size == 540 and head[4:8] == b"ni2\x00":
            raise UnsupportedFormat("NIfTI header/image pairs (.hdr + .img) are not supported; send one .nii")
    return None


def _starts_like_dicom_element(head: bytes) -> bool:
    """A dataset without preamble begins with a group 0002 or 0008 element (little endian, or big endian 0008)."""
    return head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x08")


def _parses_as_dicom(stream: BinaryIO) -> bool:
    """The fallback for preamble-less files: a forced parse that yields a dataset naming what it is."""
    from pydicom import dcmread

    try:
        with quiet():
            ds = dcmread(stream, force=True, stop_before_pixels=True, defer_size=256)
            return any(key in ds for key in ("SOPClassUID", "Modality", "SeriesInstanceUID", "Rows"))
    except Exception:
        return False


def _kind(head: bytes, stream: Callable[[], BinaryIO], what: str) -> Kind | Literal["zip"] | None:
    """The format of one file from its first bytes (``head``), or None if it is none we read."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head.startswith(NPY_MAGIC):
        return "tensor"
    if head.startswith(ZIP_MAGICS):
        return "zip"
    if nifti_version(head):
        return "nifti"
    if head.startswith(GZIP_MAGIC):
        with stream() as fp:
            inner = gunzip_prefix(fp.read(GZIP_HEAD_BYTES), NIFTI_HEAD, what)
        if nifti_version(bytes(inner)):
            return "nifti-gz"
        return None
    if _starts_like_dicom_element(head):
        with stream() as fp:
            if _parses_as_dicom(fp):
                return "dicom"
    return None


# ------------------------------------------------------------------------------------------------- uploads


def _plain(what: str, kind: Kind, data: Data) -> Member:
    return Member(what, kind, len(data), lambda: whole(data), lambda: opener(data), lambda: data)


def _zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> Member:
    def read() -> bytes:
        try:
            return archive.read(info)
        except Exception as exc:  # CRC mismatch, truncation, encryption, unknown compression
            raise InvalidImage(f"{what}: cannot be extracted ({type(exc).__name__})") from exc

    return Member(what, "dicom", info.file_size, read, lambda: archive.open(info), read)  # type: ignore[arg-type]


def _zip_members(data: Data, what: str, limits: LimitSettings, counted: int) -> list[Member]:
    """The DICOM files of a zip. Member count and declared sizes are checked from the central directory before
    anything is inflated; zipfile then never inflates a member past its declared size (and checks its CRC)."""
    try:
        archive = zipfile.ZipFile(opener(data))
        infos = [i for i in archive.infolist() if not i.is_dir() and not _SKIPPED_MEMBER.search(i.filename)]
    except Exception as exc:
        raise InvalidImage(f"{what}: not a readable zip archive ({type(exc).__name__})") from exc
    if counted + len(infos) > limits.max_files:
        raise ImageTooLarge(f"{what}: {counted + len(infos)} files in the upload, the limit is {limits.max_files}")
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_upload_bytes:
        raise PayloadTooLarge(f"{what}: unpacks to {declared} bytes, the limit is {limits.max_upload_bytes}")
    if declared > limits.expansion_bound(len(data)):
        raise ImageTooLarge(
            f"{what}: unpacks to {declared} bytes from {len(data)}, more than the allowed "
            f"{limits.max_expansion_ratio}:1 expansion beyond {limits.expansion_floor_bytes} bytes"
        )
    members = []
    for number, info in enumerate(infos, 1):
        member_label = f"{what} member {number}"  # by position, as label() and for the same reason
        try:
            with archive.open(info) as fp:
                head = fp.read(NIFTI_HEAD)
            kind = _kind(head, lambda info=info: archive.open(info), member_label) if head else None
        except Exception as exc:
            raise InvalidImage(f"{member_label}: cannot be extracted ({type(exc).__name__})") from exc
        if kind == "dicom":
            members.append(_zip_member(archive, info, member_label))
    if not members:
        raise UnsupportedFormat(f"{what}: the zip holds no DICOM file")
    return members


_FORMAT_OF: dict[str, Format] = {
    "dicom": "dicom",
    "nifti": "nifti",
    "nifti-gz": "nifti",
    "png": "png",
    "jpeg": "jpeg",
    "tensor": "tensor",
}


def classify(files: Sequence[Upload], limits: LimitSettings) -> tuple[Format, list[Member]]:
    """The upload's one format and its files (zips opened), after the size and count limits.

    Only a DICOM series may span several files; anything else is one file per request.
    """
    if not files:
        raise InvalidImage("the upload holds no file")
    total = sum(len(data) for _, data in files)
    if total > limits.max_upload_bytes:
        raise PayloadTooLarge(f"the upload has {total} bytes, the limit is {limits.max_upload_bytes}")
    if len(files) > limits.max_files:
        raise ImageTooLarge(f"the upload has {len(files)} files, the limit is {limits.max_files}")
    members: list[Member] = []
    for index, (name, data) in enumerate(files, 1):
        what = label(index, name)
        if not data:
            raise InvalidImage(f"{what}: is empty")
        head = bytes(data[:NIFTI_HEAD])
        kind = _kind(head, lambda data=data: opener(data), what)
        if kind is None:
            raise UnsupportedFormat(
                f"{what}: not DICOM, NIfTI (.nii, .nii.gz), PNG, JPEG, a NumPy .npy tensor or a zip of DICOM files"
            )
        if kind == "zip":
            members.extend(_zip_members(data, what, limits, len(members)))
        else:
            members.append(_plain(what, kind, data))
        if len(members) > limits.max_files:
            raise ImageTooLarge(f"the upload has more than {limits.max_files} files, the limit")
    kinds = {m.kind for m in members}
    if len(kinds) > 1:
        raise InvalidImage(f"the upload mixes formats ({', '.join(sorted(kinds))}); send one series or one image")
    kind = next(iter(kinds))
    if kind != "dicom" and len(members) > 1:
        raise InvalidImage(f"only a DICOM series may span several files; got {len(members)} {_FORMAT_OF[kind]} files")
    return _FORMAT_OF[kind], members
