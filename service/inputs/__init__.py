"""Reading uploads: DICOM (files, multi-frame, series, zips), NIfTI (.nii, .nii.gz), PNG, JPEG and NumPy tensors.

``probe`` is the gateway's cheap header check; ``decode`` is the worker's full read into a ``Volume``. Both raise only
the service's errors (``service.errors``), whose messages name the file and never carry header values.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.config import LimitSettings
from service.inputs import dicom, nifti, raster, tensor
from service.inputs.probe import normalise_hint, probe, tensor_layout
from service.inputs.sniff import classify
from service.inputs.volume import InputHeader, Upload, Volume

__all__ = ["InputHeader", "Upload", "Volume", "decode", "probe"]


def decode(
    files: Sequence[Upload], limits: LimitSettings, modality_hint: str | None = None, *, layout: str | None = None
) -> Volume:
    """The upload's pixels and geometry. Every check ``probe`` makes is made again first, before any allocation.

    ``layout`` only matters for tensors; without it the file name's (``tensor.NHWC.npy``) or the shape's is used.
    """
    fmt, members = classify(files, limits)
    hint = normalise_hint(modality_hint)
    if fmt == "dicom":
        return dicom.decode(members, limits, hint)
    if fmt == "nifti":
        return nifti.decode(members[0], limits, hint)
    if fmt == "tensor":
        member = members[0]
        return tensor.decode_tensor(member.read(), limits, tensor_layout(files, layout), hint, member.label)
    return raster.decode(members[0], fmt, limits, hint)
