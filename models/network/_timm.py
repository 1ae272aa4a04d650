"""Import timm on machines where PyPI's torchvision cannot load.

timm needs only torchvision's pure-Python parts. PyPI's torchvision wheel is a CUDA build: beside
the CPU torch this project pins, its compiled ops cannot load, and its import then dies on an
unguarded fake-kernel registration for ``torchvision::nms`` with a RuntimeError (not an ImportError),
taking timm with it. Declaring the two op schemas it registers against lets the pure-Python parts
import; the ops themselves stay unavailable, and C2P never calls them. Where torchvision loads
properly (CUDA machines, matching builds) nothing is changed.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fragment: torch.library.Library | None = None


def import_timm() -> ModuleType:
    global _fragment
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        if _fragment is None:
            _fragment = torch.library.Library("torchvision", "FRAGMENT")
            for schema in _SCHEMAS:
                _fragment.define(schema)
    import timm

    return timm
