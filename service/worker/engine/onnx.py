"""ONNX Runtime engine: the serving format. CUDA provider when present and wanted, else CPU."""

from __future__ import annotations

import json

import numpy as np

from models.files import ONNX_METADATA_KEY
from service.config import EngineSettings
from service.errors import ArtifactInvalid
from service.worker.engine.artifact import Artifact, check_embedded
from service.worker.engine.base import check_batch


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise ArtifactInvalid("C2P_ENGINE__DEVICE=cuda but ONNX Runtime has no CUDA provider (install onnxruntime-gpu)")
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxEngine:
    def __init__(self, artifact: Artifact, settings: EngineSettings) -> None:
        import onnxruntime as ort

        self.artifact = artifact
        self.max_batch = settings.max_batch_size
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        spin = "1" if settings.spin_wait else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        try:
            self.session = ort.InferenceSession(
                str(artifact.path), sess_options=options, providers=providers_for(settings.device)
            )
        except Exception as err:  # ORT raises its own exception types for corrupt or foreign graphs
            raise ArtifactInvalid(f"ONNX Runtime cannot load {artifact.path}: {err}") from err
        metadata = self.session.get_modelmeta().custom_metadata_map
        embedded = json.loads(metadata[ONNX_METADATA_KEY]) if ONNX_METADATA_KEY in metadata else None
        check_embedded(artifact, embedded)
        names = [o.name for o in self.session.get_outputs()]
        if names != artifact.output_names:
            raise ArtifactInvalid(f"{artifact.path} outputs {names}, its card promises {artifact.output_names}")
        self.input_name = self.session.get_inputs()[0].name
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = check_batch(images, self.artifact.input_size, self.max_batch)
        outputs = self.session.run(None, {self.input_name: images})
        return dict(zip(self.artifact.output_names, outputs, strict=True))
