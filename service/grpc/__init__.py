"""The gRPC side of the service: the c2p.v1 API, the Open Inference Protocol, health and reflection.

The protobuf modules are generated from proto/ (``service.grpc.codegen``) and re-exported here:
``segmentation_pb2``, ``segmentation_pb2_grpc`` (package c2p.v1) and ``inference_pb2``,
``inference_pb2_grpc`` (package inference, proto/inference/grpc_service.proto).

They are loaded on first use rather than when this package is imported, so that a build step can
import ``service.grpc.codegen`` to generate the code without needing it to exist already; the first
access checks that the generated code matches the protos and regenerates it when it does not.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.grpc.gen.c2p.v1 import segmentation_pb2, segmentation_pb2_grpc
    from service.grpc.gen.inference import grpc_service_pb2 as inference_pb2
    from service.grpc.gen.inference import grpc_service_pb2_grpc as inference_pb2_grpc

__all__ = ["inference_pb2", "inference_pb2_grpc", "segmentation_pb2", "segmentation_pb2_grpc"]

_MODULES = {
    "segmentation_pb2": "service.grpc.gen.c2p.v1.segmentation_pb2",
    "segmentation_pb2_grpc": "service.grpc.gen.c2p.v1.segmentation_pb2_grpc",
    "inference_pb2": "service.grpc.gen.inference.grpc_service_pb2",
    "inference_pb2_grpc": "service.grpc.gen.inference.grpc_service_pb2_grpc",
}
_lock = threading.Lock()
_checked = False


def __getattr__(name: str) -> ModuleType:
    global _checked
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _lock:
        if not _checked:
            # Imported here, not above: ``python -m service.grpc.codegen`` must not find it imported already.
            from service.grpc.codegen import ensure_generated

            ensure_generated()
            _checked = True
    module = importlib.import_module(_MODULES[name])
    globals()[name] = module  # later lookups skip __getattr__
    return module
