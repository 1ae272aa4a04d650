"""The result schema: pydantic models shared by REST, gRPC, the worker and ``c2p segment``.

Versioned (``schema_version``) because PACS bridges parse it for years. Nothing here may carry a
patient identifier: the input is described by geometry and modality only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.cards import INTENDED_USE
from models.concepts import UNKNOWN, code_of

SCHEMA_VERSION = "1.1"

JobStatus = Literal["queued", "running", "succeeded", "failed"]
Level = Literal["high", "medium", "low"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ErrorInfo(_Model):
    code: str
    message: str


class ModelInfo(_Model):
    name: str = Field(description="a repository model's name, or the default model's variant, e.g. c2p-femto-192")
    version: str = Field(
        description="a repository model's version, or the first 12 hex digits of the default model's artifact digest"
    )
    digest: str = Field(description="sha256 of the served artifact file")
    engine: str = Field(description="onnx or torchscript")


class Preprocessing(_Model):
    method: Literal["ct-window", "percentile", "window", "rgb", "minmax"]
    window: tuple[float, float] | None = Field(None, description="(center, width) in stored units after rescale")
    percentiles: tuple[float, float] | None = None
    input_size: int = Field(description="side of the square the network saw; masks are resized back")
    resize: Literal["letterbox", "stretch"] = Field(
        "letterbox",
        description="how each slice reached the square: letterbox keeps its aspect (centred on black bands, the"
        " mask cropped back from the same box); stretch (recipe version 1 models) squashes it to the square",
    )
    pixels_per_model_pixel: tuple[float, float] | None = Field(
        None,
        description="(rows, columns) of input pixels behind one pixel of the network's square: the effective"
        " resolution; above 1 the network saw the slice shrunk (fine detail is lost), unequal means it was stretched",
    )


class InputInfo(_Model):
    format: Literal["dicom", "nifti", "png", "jpeg", "tensor"]
    modality: str | None = Field(None, description="DICOM Modality (CT, MR, US, ...) or the caller's hint")
    shape: tuple[int, int, int] = Field(description="(z, y, x): slices, rows, columns")
    channels: int = Field(1, description="1 for grey, 3 for RGB (colour ultrasound, endoscopy, photos)")
    spacing: tuple[float, float, float] | None = Field(None, description="(z, y, x) in mm when known")
    orientation: str | None = Field(
        None,
        description="where the column, row and slice axes point: axis codes in the input's own world frame,"
        " e.g. LPS for an axial DICOM series, PSR-like codes for a sagittal one, RAS for a standard NIfTI",
    )
    affine: list[list[float]] | None = Field(None, description="4x4 voxel-to-world matrix when known")
    stored_orientation: str | None = Field(
        None,
        description="a NIfTI file's own axis codes when its voxels were reoriented to be sliced in the configured"
        " plane; shape, affine, orientation and the mask are then on the reoriented grid (same world), and the NIfTI"
        " output is written back on the file's own grid",
    )
    preprocessing: Preprocessing


class SliceMask(_Model):
    index: int
    counts: str = Field(description="COCO compressed RLE counts (column-major), as pycocotools reads")
    area: int = Field(description="foreground pixels")


class Mask(_Model):
    encoding: Literal["coco-rle"] = "coco-rle"
    size: tuple[int, int] = Field(description="(height, width) of every slice")
    slices: list[SliceMask]


class Geometry(_Model):
    """The 14 normalised geometry values (see models/geometry.py), by name."""

    values: dict[str, float]


class SliceReliability(_Model):
    index: int
    score: float = Field(ge=0, le=1)
    level: Level
    suppressed: bool = Field(
        description="emptied by the empty gate, the content gate, the abstention bound or an opted-in outlier erase"
    )
    abstained: bool = Field(False, description="a finding scored below the card's abstention bound: not returned")
    outlier: bool = Field(False, description="geometry out of line with the neighbouring slices (flagged, kept)")
    blank: bool = Field(False, description="no content after preprocessing: empty without running the model")
    agreement: float
    consistency: float
    geometry_agreement: float
    view_weights: tuple[float, float, float]
    view_inconsistency: tuple[float, float, float]
    geometry_predicted: dict[str, float]
    geometry_measured: dict[str, float | None]


class Reliability(_Model):
    score: float = Field(ge=0, le=1, description="area-weighted mean of the slices' scores (plain mean if empty)")
    level: Level = Field(description="the score against the model card's calibrated bounds (what each promises)")
    suppressed: bool = Field(description="the whole result is empty because every slice was gated")
    reason: Literal["blank_input", "low_confidence"] | None = Field(
        None,
        description="why the result is empty: blank_input = no content in any slice; low_confidence = what the model "
        "found scored below the card's abstention bound, so nothing is returned (review the image)",
    )
    outlier_slices: list[int] = Field(
        default_factory=list, description="slices out of line with their neighbours; kept unless erasing is opted in"
    )
    slices: list[SliceReliability]


class Code(_Model):
    """A coded concept (DICOM's code triplet): SNOMED CT from pydicom's dictionary."""

    scheme: str
    value: str
    meaning: str


def unknown_concept() -> ConceptInfo:
    codes = code_of(UNKNOWN)
    return ConceptInfo(name=UNKNOWN, code=Code(**codes["type"]), category=Code(**codes["category"]), similarity=0.0)


class ConceptInfo(_Model):
    name: str = Field(description="what the model says it segmented; 'no finding' when empty, 'unknown' when unsure")
    code: Code = Field(description="segmented property type")
    category: Code = Field(description="segmented property category")
    similarity: float = Field(description="cosine of the model's concept embedding to the name's (1 for no finding)")


class Timings(_Model):
    queue_ms: float = 0.0
    decode_ms: float = 0.0
    inference_ms: float = 0.0
    encode_ms: float = 0.0


class SegmentationResult(_Model):
    schema_version: str = SCHEMA_VERSION
    model: ModelInfo
    input: InputInfo
    mask: Mask
    reliability: Reliability
    timings: Timings
    concept: ConceptInfo = Field(
        default_factory=lambda: unknown_concept(),
        description="what the model says it segmented (a result stored before concepts existed reads 'unknown')",
    )
    intended_use: str = Field(INTENDED_USE, description="what the model is for, from its card: research use only")


class Forwarding(_Model):
    """Sending the finished DICOM SEG to the configured DICOMweb destination (jobs that came in by STOW-RS)."""

    status: Literal["pending", "sent", "failed"]
    attempts: int = 0
    destination: str = Field(description="the DICOMweb root it goes to, without credentials")
    sop_instance_uid: str | None = Field(None, description="the SEG instance sent")
    error: str | None = Field(None, description="the last attempt's failure")
    updated_at: datetime


class Job(_Model):
    id: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    deliveries: int = Field(0, description="times a worker took the job (more than 1 after a crash or hand-back)")
    error: ErrorInfo | None = None
    result: SegmentationResult | None = None
    forwarding: Forwarding | None = None
