"""Real inputs for load tests, made in memory from data that ships inside installed packages (nothing downloaded).

Load tests should send what the service will see in production, not synthetic blobs: the DICOM parser, the series
sort, the NIfTI reader and the PNG decoder each cost something different, and a leak or a slow path in one of them
only shows with its own kind of input. So every kind here is real data:

========================  ===============================================================================
``dicom-ct``              pydicom's CT_small.dcm as is (one 128x128 CT slice, explicit VR little endian)
``dicom-mr``              pydicom's MR_small.dcm as is (one 64x64 MR slice)
``dicom-series``          CT_small.dcm copied into ``SERIES_SLICES`` instances of one series: distinct
                          SOPInstanceUIDs, positions 5 mm apart along the slice normal, instance numbers
                          (what tests/service/test_inputs.py's ``ct_series`` does; the service sorts by position)
``nifti-mni``             nilearn's packaged MNI152 2009a T1 template (1 mm, uint8), ``NIFTI_SLICES`` axial
                          slices through the middle of the brain at the native in-plane size, gzipped
``png-camera``            scikit-image's ``camera()`` (512x512 grey photograph) as PNG
========================  ===============================================================================

The MNI template is read straight from nilearn's package data with nibabel: it is the file
``nilearn.datasets.load_mni152_template`` itself loads, and importing ``nilearn.datasets`` costs seconds and pulls
scikit-learn and pandas into every load-generator process. When the file is not where nilearn 0.10-0.14 keeps it,
``load_mni152_template(resolution=2)`` is the fallback.

Everything is built once per process (``load_inputs`` is cached): a locust worker or the soak driver pays for it
once, before the first request, and every user shares the same bytes.
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.util
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

# Not C2P_*: a shell exporting it often starts the service too, which refuses C2P_ names it does not know.
KEY_ENV = "LOAD_API_KEY"
SERIES_SLICES = 8
SERIES_SPACING_MM = 5.0  # CT_small's SliceThickness
NIFTI_SLICES = 8
MNI_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

Upload = tuple[str, bytes]  # (file name, bytes): what the service's inputs.probe/decode take


@dataclass(frozen=True)
class LoadInput:
    """One request's worth of files, with what a client would send beside them."""

    kind: str
    files: tuple[Upload, ...]
    content_type: str  # for multipart parts
    modality: str | None  # the hint a client gives for formats that do not say (NIfTI, PNG)
    shape: tuple[int, int, int]  # (z, y, x) the service should report, for checks

    @property
    def nbytes(self) -> int:
        return sum(len(data) for _, data in self.files)


def _dataset(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:  # pydicom ships these two in its wheel; None would mean a broken install
        raise FileNotFoundError(f"pydicom's test file {name} is missing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sample files carry a few non-conformant values
        return pydicom.dcmread(path)


def _dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer)
    return buffer.getvalue()


def single_dicom(name: str = "CT_small.dcm") -> Upload:
    """A pydicom test file as it ships (read back from disk, not rewritten, so its bytes are the original ones)."""
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom's test file {name} is missing")
    return name, Path(path).read_bytes()


def ct_series(slices: int = SERIES_SLICES, spacing_mm: float = SERIES_SPACING_MM) -> list[Upload]:
    """CT_small.dcm as ``slices`` instances of one series, stacked along its slice normal ``spacing_mm`` apart.

    Each copy gets its own SOPInstanceUID (the service refuses duplicates), ImagePositionPatient moved along the
    normal of ImageOrientationPatient (the service sorts on that), InstanceNumber and SliceLocation to match. The
    pixels are CT_small's own, shifted by the slice index so that a mix-up of slices would be visible.
    """
    base = _dataset("CT_small.dcm")
    orientation = np.asarray(base.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.asarray(base.ImagePositionPatient, dtype=float)
    pixels = base.pixel_array
    files = []
    for index in range(slices):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        position = origin + normal * spacing_mm * index
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceLocation = round(float(position @ normal), 4)
        ds.InstanceNumber = index + 1
        ds.PixelData = (pixels + index).astype(pixels.dtype).tobytes()
        files.append((f"CT{index + 1:04d}.dcm", _dicom_bytes(ds)))
    return files


def _mni_template() -> nib.Nifti1Image:
    """The 1 mm MNI152 T1 template from nilearn's package data, without importing nilearn (module docstring)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / MNI_FILE
        if path.is_file():
            return nib.load(path)
    from nilearn.datasets import load_mni152_template  # seconds to import; only when the file moved

    return load_mni152_template(resolution=2)


def mni_nifti(slices: int = NIFTI_SLICES) -> Upload:
    """``slices`` axial slices through the middle of the MNI152 T1, native in-plane grid and dtype, as .nii.gz.

    ``slicer`` keeps the header's scaling and moves the affine's origin to the first kept slice, so the service
    sees a correct world geometry, not just pixels.
    """
    template = _mni_template()
    z0 = template.shape[2] // 2 - slices // 2
    slab = template.slicer[:, :, z0 : z0 + slices]
    data = np.asarray(slab.dataobj)
    image = nib.Nifti1Image(data, slab.affine, slab.header)
    buffer = io.BytesIO()
    image.to_file_map(image.make_file_map({"image": buffer, "header": buffer}))
    return "mni152_t1.nii.gz", gzip.compress(buffer.getvalue(), compresslevel=6)


def camera_png() -> Upload:
    """scikit-image's ``camera`` photograph (ships in the wheel, unlike most of skimage.data) as a grey PNG."""
    from skimage import data  # imported here: only this input needs scikit-image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(data.camera(), dtype=np.uint8)).save(buffer, format="PNG")
    return "camera.png", buffer.getvalue()


def _nifti_shape(upload: Upload) -> tuple[int, int, int]:
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(gzip.decompress(upload[1])[:352]))
    x, y, z = (int(v) for v in header.get_data_shape()[:3])
    return z, y, x


@functools.cache
def load_inputs() -> dict[str, LoadInput]:
    """Every kind, built once per process (about a second); keys are the kinds in the module docstring."""
    ct, mr = single_dicom("CT_small.dcm"), single_dicom("MR_small.dcm")
    series = ct_series()
    nifti = mni_nifti()
    png = camera_png()
    dicom = "application/dicom"
    return {
        "dicom-ct": LoadInput("dicom-ct", (ct,), dicom, None, (1, 128, 128)),
        "dicom-mr": LoadInput("dicom-mr", (mr,), dicom, None, (1, 64, 64)),
        "dicom-series": LoadInput("dicom-series", tuple(series), dicom, None, (len(series), 128, 128)),
        "nifti-mni": LoadInput("nifti-mni", (nifti,), "application/gzip", "MR", _nifti_shape(nifti)),
        "png-camera": LoadInput("png-camera", (png,), "image/png", None, (1, 512, 512)),
    }


# How often each kind is sent relative to the others: single DICOM slices are the bulk of PACS traffic, series
# and volumes cost the most per request. Shared by the locustfile and the soak driver so both mean the same mix.
WEIGHTS: dict[str, int] = {"dicom-ct": 2, "dicom-mr": 1, "dicom-series": 2, "nifti-mni": 2, "png-camera": 2}


def credentials(key: str | None = None) -> list[tuple[str, str]]:
    """``[("authorization", "Bearer KEY")]`` for ``key`` or ``$LOAD_API_KEY``, usable as REST headers and gRPC
    metadata; empty for a service running open on loopback."""
    key = key or os.environ.get(KEY_ENV, "")
    return [("authorization", f"Bearer {key}")] if key else []
