"""The Open Inference Protocol's model of this service, shared by its REST and gRPC transports.

One input, ``image`` (UINT8 or FP32, in a layout service/inputs/tensor.py reads), and three outputs: ``mask`` UINT8
[slices, rows, columns] on the input's grid, ``score`` FP32 [slices] (each slice's reliability score) and ``report``
BYTES [1] (the whole result JSON). What a result says beyond the tensors (the job, the reliability, the concept and
the intended use) travels as the answer's parameters. Each transport only encodes these on its own wire.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.dataplane.models import VERSION_DIGITS
from service.errors import InvalidRequest
from service.inputs import tensor
from service.outputs import rle
from service.schema import Job, SegmentationResult

INPUT = "image"
OUTPUTS = ("mask", "score", "report")
DATATYPES: dict[str, np.dtype] = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}

# One input and three outputs. The protocol allows one datatype per input, so the input is listed as UINT8 (pictures,
# the common case) and ``properties`` says FP32 is accepted too, with the layouts and the rules; listing FP32 as a
# second input would tell clients to send two tensors.
INPUTS_METADATA = [{"name": INPUT, "datatype": "UINT8", "shape": [-1, -1, -1]}]
OUTPUTS_METADATA = [
    {"name": "mask", "datatype": "UINT8", "shape": [-1, -1, -1]},
    {"name": "score", "datatype": "FP32", "shape": [-1]},
    {"name": "report", "datatype": "BYTES", "shape": [1]},
]
PROPERTIES = {
    "input.image.datatypes": "UINT8,FP32",
    "input.image.layouts": ",".join(tensor.LAYOUTS),
    "input.image.default_layout": "rank 2: HW; rank 3: HWC if the last axis is 1 or 3, else CHW if the first is,"
    " else NHW; rank 4: NHWC if the last axis is 1 or 3, else NCHW",
    "input.image.values": "UINT8: grey or RGB 0..255; FP32 grey: intensities (Hounsfield units with modality=CT);"
    " FP32 RGB: values in [0, 1]",
    "parameters": "layout (HW, HWC, CHW, NHW, NHWC, NCHW), modality (CT, MR, US, ...), timeout (microseconds)",
    "output.mask": "0/1 per pixel, [slices, rows, columns] on the input's grid",
    "output.score": "reliability score of each slice, in [0, 1]",
    "output.report": "the full result JSON (schema of /v1/segmentations results)",
}


def check_output(name: str) -> None:
    if name not in OUTPUTS:
        raise InvalidRequest(f"unknown output {name!r}; outputs are {', '.join(OUTPUTS)}")


def outputs_of(result: SegmentationResult) -> dict[str, tuple[str, list[int], np.ndarray | bytes]]:
    """name -> (datatype, shape, value): the masks decoded from the result's RLE, one score per slice, the JSON."""
    height, width = result.mask.size
    slices = sorted(result.mask.slices, key=lambda s: s.index)
    mask = np.zeros((len(slices), height, width), dtype=np.uint8)
    for k, piece in enumerate(slices):
        mask[k] = rle.decode({"size": [height, width], "counts": piece.counts})
    scores = sorted(result.reliability.slices, key=lambda s: s.index)
    score = np.array([s.score for s in scores], dtype=np.float32)
    report = result.model_dump_json().encode()
    return {
        "mask": ("UINT8", list(mask.shape), mask),
        "score": ("FP32", [len(score)], score),
        "report": ("BYTES", [1], report),
    }


def result_parameters(result: SegmentationResult) -> dict[str, str]:
    """What the answer says beyond the tensors, as string parameters: the concept and the intended use."""
    concept = result.concept
    return {
        "concept": concept.name,
        "concept_code": f"{concept.code.scheme}:{concept.code.value}",
        "concept_meaning": concept.code.meaning,
        "intended_use": result.intended_use,
    }


def answer_of(job: Job) -> tuple[str, str, dict[str, Any]]:
    """(model name, model version, parameters) of a finished job's answer."""
    result = job.result
    assert result is not None
    parameters: dict[str, Any] = {
        "job_id": job.id,
        "reliability_score": result.reliability.score,
        "reliability_level": result.reliability.level,
        **result_parameters(result),
    }
    return result.model.name, result.model.digest[:VERSION_DIGITS], parameters
