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

__all__ = ["InputHeader", "Upload", "Volume", "decode", "one_series", "probe"]


def one_series(files: Sequence[Upload], limits: LimitSettings, series_uid: str) -> list[Upload]:
    """Only the files of the DICOM series ``series_uid`` (zips opened), named by position: what the queue holds
    when a caller picks one series out of an upload that holds several."""
    from service.errors import InvalidRequest

    fmt, members = classify(files, limits)
    if fmt != "dicom":
        raise InvalidRequest(f"series_uid picks a DICOM series; this upload is {fmt}")
    return [(f"instance-{k + 1}.dcm", m.upload()) for k, m in enumerate(dicom.select(members, limits, series_uid))]


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
