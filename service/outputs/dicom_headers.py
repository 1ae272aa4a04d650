"""Source instance headers without their pixels: what a DICOM SEG needs from its sources, kept beside a job.

The worker keeps each instance's header (``header_only``) while it decodes the series, stores the headers as Part 10
bytes with the job (``encode_headers``) and, when a SEG is asked for, they come back from Redis and are read as
untrusted input (``decode_headers``). pydicom only: the gateway's DICOM reader imports this module, and highdicom
(service.outputs.dicom_seg) costs a gateway 20 MB it never needs.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from service.errors import InvalidImage

# Top-level elements a stored header leaves out: the pixels in any of their three forms, and the trailing padding.
_DROPPED_TAGS = frozenset({Tag(0x7FE00010), Tag(0x7FE00008), Tag(0x7FE00009), Tag(0xFFFCFFFC)})
# What a stored header must have to be a source image at all.
REQUIRED_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns")


@contextmanager
def quiet() -> Iterator[None]:
    """Silence pydicom's and highdicom's warnings while headers are handled: they describe quirks of untrusted files
    and quote their values, patient data included (highdicom warns with the patient's name when it has a single
    component). The service's readers do the same (service.inputs.sniff.quiet, not imported here: the DICOM reader
    imports this module). Matching by module keeps a filter that leaks out of catch_warnings, which is process-global
    while decoding runs in threads, harmless."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(pydicom|highdicom)(\.|$)")
        yield


def shallow_view(ds: Dataset) -> Dataset:
    """A new dataset over the same element objects. Adding or replacing an element in it leaves ``ds`` alone, which
    ``copy.copy`` would not do: a shallow copy of a pydicom dataset shares its element dict."""
    out = Dataset(dict(ds.items()))
    implicit, little = ds.original_encoding
    out.set_original_encoding(implicit, little, ds.original_character_set)
    if "file_meta" in ds.__dict__:
        out.file_meta = ds.file_meta
    return out


def _file_meta(ds: Dataset) -> FileMetaDataset:
    """A copy of the file meta, with a transfer syntax even where the file had none (the reader accepts those), so
    the header can be written as a Part 10 file."""
    meta = copy.deepcopy(ds.file_meta) if "file_meta" in ds.__dict__ else FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if little is False:
            meta.TransferSyntaxUID = ExplicitVRBigEndian
        elif implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _immutable(element: DataElement | RawDataElement) -> bool:
    return isinstance(element, RawDataElement) and element.VR is not None and isinstance(element.value, bytes | None)


def header_only(ds: Dataset) -> Dataset:
    """A copy of a source instance without its pixel data (PixelData, FloatPixelData, DoubleFloatPixelData, and the
    data set trailing padding), keeping file_meta, so the worker can keep and store the headers cheaply. The result
    is still usable as a highdicom source image.

    Values the reader deferred are loaded first: the copy has no file to load them from later. Elements still raw
    (undecoded bytes, immutable) are shared with ``ds``, the rest (decoded values, sequences) copied, which keeps a
    typical header at a fraction of a millisecond."""
    with quiet():
        for tag, element in list(ds.items()):
            deferred = isinstance(element, RawDataElement) and element.value is None and element.length
            # Read as implicit VR (a file whose meta says otherwise, as pydicom's SC_rgb_jpeg.dcm): without its VR
            # the element cannot be written in the explicit syntax the header is stored in, so decode it now.
            untyped = isinstance(element, RawDataElement) and element.VR is None
            if (deferred or untyped) and tag not in _DROPPED_TAGS:
                ds[tag]  # reading the element loads its value (and its dictionary VR) into ds
        out = Dataset(
            {
                tag: element if _immutable(element) else copy.deepcopy(element)
                for tag, element in ds.items()
                if tag not in _DROPPED_TAGS
            }
        )
    implicit, little = ds.original_encoding
    out.set_original_encoding(implicit, little, ds.original_character_set)
    out.file_meta = _file_meta(ds)
    return out


def encode_headers(datasets: Sequence[Dataset]) -> list[bytes]:
    """Each header as a DICOM Part 10 file (preamble, file meta, data set in its transfer syntax). The caller's
    datasets are not changed: writing fills in missing file meta elements, on a copy."""
    blobs = []
    for number, ds in enumerate(datasets, 1):
        writable = shallow_view(ds)
        writable.file_meta = _file_meta(ds)
        buffer = io.BytesIO()
        try:
            with quiet():
                dcmwrite(buffer, writable, enforce_file_format=True)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise InvalidImage(
                f"header {number} of {len(datasets)} cannot be written as a DICOM file ({type(exc).__name__})"
            ) from exc
        blobs.append(buffer.getvalue())
    return blobs


def _parse_public(ds: Dataset) -> None:
    """Decode every public value, in sequences too: what highdicom may read then cannot fail later. Private elements
    are left raw; nothing here reads them, and they are half of a typical header's decoding time."""
    for tag in list(ds.keys()):
        if tag.is_private:
            continue
        element = ds[tag]
        if element.VR == "SQ":
            for item in element.value:
                _parse_public(item)


def decode_headers(blobs: Sequence[bytes]) -> list[Dataset]:
    """The inverse of ``encode_headers``, for bytes that come back from Redis and so are treated as untrusted: only
    Part 10 files are accepted (``force=False``), and every value is parsed here, so a corrupt one fails now as
    ``InvalidImage`` rather than later inside highdicom. Messages name the header, never a value (patient data)."""
    datasets = []
    for number, blob in enumerate(blobs, 1):
        what = f"stored DICOM header {number} of {len(blobs)}"
        if not isinstance(blob, bytes | bytearray | memoryview) or not blob:
            raise InvalidImage(f"{what} is empty")
        try:
            with quiet():
                ds = dcmread(io.BytesIO(blob), force=False)
                _parse_public(ds)
        except Exception as exc:  # any parser failure on hostile bytes: struct.error, EOFError, ValueError, ...
            raise InvalidImage(f"{what} is not a readable DICOM Part 10 file ({type(exc).__name__})") from exc
        # pydicom reads a preamble and "DICM" followed by junk as a data set of junk elements, with a warning.
        if "TransferSyntaxUID" not in ds.file_meta or any(keyword not in ds for keyword in REQUIRED_KEYWORDS):
            raise InvalidImage(f"{what} is not a DICOM image header (no transfer syntax, SOP or image attributes)")
        datasets.append(ds)
    return datasets
