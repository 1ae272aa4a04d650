"""TorchScript engine: the second runtime, for sites that run PyTorch and not ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import torch

from models.files import TORCHSCRIPT_CARD_FILE
from service.config import EngineSettings
from service.errors import ArtifactInvalid
from service.worker.engine.artifact import Artifact, check_embedded
from service.worker.engine.base import check_batch


def torch_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ArtifactInvalid("C2P_ENGINE__DEVICE=cuda but torch sees no CUDA device")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


class TorchScriptEngine:
    def __init__(self, artifact: Artifact, settings: EngineSettings) -> None:
        self.artifact = artifact
        self.max_batch = settings.max_batch_size
        self._device = torch_device(settings.device)
        self.device = self._device.type
        if settings.intra_op_threads:
            torch.set_num_threads(settings.intra_op_threads)
        extra = {TORCHSCRIPT_CARD_FILE: ""}
        try:
            module = torch.jit.load(str(artifact.path), map_location=self._device, _extra_files=extra)
        except Exception as err:  # torch raises RuntimeError or zipfile errors for foreign files
            raise ArtifactInvalid(f"TorchScript cannot load {artifact.path}: {err}") from err
        check_embedded(artifact, json.loads(extra[TORCHSCRIPT_CARD_FILE]) if extra[TORCHSCRIPT_CARD_FILE] else None)
        # Freezing folds weights and batch norms into constants: same numbers, less work per call.
        self.module = torch.jit.freeze(module.eval())

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = check_batch(images, self.artifact.input_size, self.max_batch)
        with torch.inference_mode():
            outputs = self.module(torch.from_numpy(images).to(self._device))
        return {name: out.cpu().numpy() for name, out in zip(self.artifact.output_names, outputs, strict=True)}
