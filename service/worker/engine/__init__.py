"""Engines run an exported serving graph; ``load_engine`` picks one from the settings."""

from __future__ import annotations

from pathlib import Path

from service.config import EngineSettings
from service.worker.engine.artifact import Artifact, open_artifact
from service.worker.engine.base import Engine, check_batch, warm_up

__all__ = ["Artifact", "Engine", "check_batch", "load_engine", "open_artifact", "warm_up"]


def load_engine(directory: str | Path, settings: EngineSettings) -> Engine:
    artifact = open_artifact(directory, settings.kind)
    if settings.kind == "onnx":
        from service.worker.engine.onnx import OnnxEngine

        return OnnxEngine(artifact, settings)
    from service.worker.engine.torchscript import TorchScriptEngine

    return TorchScriptEngine(artifact, settings)
