"""The gateway's look at an upload: format, declared shape and limits, from headers alone.

Refusing a 2 GB volume or a mixed series here costs milliseconds and keeps it out of the queue; nothing in this
path decodes a pixel (the worker does, and checks everything again: it does not trust the gateway either).
"""

from __future__ import annotations

from collections.abc import Sequence

from service.config import LimitSettings
from service.inputs import dicom, nifti, raster, tensor
from service.inputs.sniff import classify
from service.inputs.volume import InputHeader, Upload


def normalise_hint(modality_hint: str | None) -> str | None:
    """A caller's modality hint in DICOM's spelling ("ct" -> "CT"); blank means none."""
    hint = (modality_hint or "").strip().upper()
    return hint or None


def tensor_layout(files: Sequence[Upload], layout: str | None) -> str | None:
    """An explicit layout, else the one the tensor's file name carries; None leaves it to the shape.

    The name carries it so a queued tensor needs nothing beyond what every upload has (names and bytes).
    """
    return layout or tensor.layout_from_name(files[0][0])


def probe(
    files: Sequence[Upload], limits: LimitSettings, modality_hint: str | None = None, *, layout: str | None = None
) -> InputHeader:
    """Format, modality, declared (z, y, x) shape and channels of an upload, after the limits and the series'
    consistency are checked. A DICOM's own Modality wins over the hint. ``layout`` is for tensors (see ``decode``)."""
    fmt, members = classify(files, limits)
    hint = normalise_hint(modality_hint)
    if fmt == "dicom":
        return dicom.probe(members, limits, hint)
    if fmt == "nifti":
        return nifti.probe(members[0], limits, hint)
    if fmt == "tensor":
        member = members[0]
        return tensor.probe_tensor(member.upload(), limits, tensor_layout(files, layout), hint, member.label)
    return raster.probe(members[0], fmt, limits, hint)
