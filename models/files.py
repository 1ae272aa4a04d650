"""File names and digests of checkpoints and exports, without torch.

A worker serving an export folder reads these and needs nothing else from ``models``; keeping them
here lets it run without importing torch (seconds of start-up and hundreds of MB per process).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.ts"
CARD_FILE = "card.json"
ONNX_METADATA_KEY = "c2p.card"
TORCHSCRIPT_CARD_FILE = "card.json"
# The float32 weights a stripped ONNX graph reads as external data (models.restore writes them).
WEIGHTS_DATA_FILE = "weights.bin"
# What the package ships per variant: <variant>.safetensors + .json (the checkpoint and its card), and
# <variant>.onnx + .export.json (the serving graph without its weights, and its export card).
WEIGHTS_DIR = Path(__file__).parent / "weights"
# Beside a dataset's imagesTs/: each CT or MR test case's scan before the recipe (<case>.nii.gz), written by the
# generators and sent as a file by `c2p evaluate --through-service`.
RAW_FOLDER = "rawTs"


def write_scan(path: Path, raw: np.ndarray, units: str | None) -> Path:
    """One 2D scan as a one-slice NIfTI, indexed as the project's reader and nnU-Net index it (rows along voxel
    axis 1): CT as int16 HU, anything else float32. The affine says what the picture shows: columns towards the
    patient's left, rows towards posterior, as an axial slice is displayed, which is the convention the service
    slices NIfTI volumes into (service/inputs/orientation.py), so the service sees the picture as drawn."""
    import nibabel as nib

    values = np.rint(raw).astype(np.int16) if units == "CT" else raw.astype(np.float32)
    image = nib.Nifti1Image(np.ascontiguousarray(values.T[..., None]), np.diag([-1.0, -1.0, 1.0, 1.0]))
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
