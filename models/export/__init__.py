"""Export drivers: the serving graph to ONNX and TorchScript, each with the card embedded."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import resolve
from models.consensus import OUTPUT_NAMES
from models.export.card import build_card
from models.export.wrapper import INPUT_NAME, ServingGraph
from models.files import CARD_FILE, ONNX_FILE, ONNX_METADATA_KEY, TORCHSCRIPT_CARD_FILE, TORCHSCRIPT_FILE, sha256_file
from models.registry import build_c2p

log = logging.getLogger(__name__)

OPSET = 20
# Parity with eager PyTorch that an export must show on its probe batch before it is written out.
PARITY_ATOL = 1e-4
PARITY_OUTPUTS = ("prob", "view_weights", "geometry_pred")


def probe_batch(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A deterministic batch with image-like structure (smooth blobs), not white noise."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, 3, max(size // 16, 2), max(size // 16, 2), generator=generator)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def export_onnx(graph: ServingGraph, example: torch.Tensor, path: Path, card: dict[str, Any]) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    # torch's exporter trips over its own deprecations (FutureWarning from pytree internals); nothing a
    # caller could act on, and fatal where warnings are errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        program = _dynamo_export(graph, example, batch)
    program.optimize()
    model = program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(card, sort_keys=True)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _dynamo_export(graph: ServingGraph, example: torch.Tensor, batch: torch.export.Dim):
    return torch.onnx.export(
        graph,
        (example,),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={"image": {0: batch}},
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )


def export_torchscript(graph: ServingGraph, example: torch.Tensor, path: Path, card: dict[str, Any]) -> None:
    # The tracer warns at every shape read it cannot follow (torch's own group_norm batch check, image
    # sizes that are fixed per artifact anyway). Parity at batch sizes other than the traced one is
    # what shows the trace generalises: ``verify`` here and the export tests check exactly that.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(graph, (example,), check_trace=False, strict=False)
    torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_CARD_FILE: json.dumps(card, sort_keys=True)})


def _max_gaps(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.abs(reference[name] - other[name]).max()) for name in PARITY_OUTPUTS}


def verify(out_dir: Path, graph: ServingGraph, example: torch.Tensor) -> dict[str, dict[str, float]]:
    """Run both artifacts on the probe batch; refuse the export if either drifts from eager PyTorch."""
    import onnxruntime as ort

    with torch.no_grad():
        eager = {k: v.numpy() for k, v in graph(example)._asdict().items()}
    session = ort.InferenceSession(str(out_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    onnx_out = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: example.numpy()}), strict=True))
    scripted = torch.jit.load(str(out_dir / TORCHSCRIPT_FILE), map_location="cpu")
    with torch.no_grad():
        ts_out = dict(zip(OUTPUT_NAMES, (t.numpy() for t in scripted(example)), strict=True))
    gaps = {"onnx": _max_gaps(eager, onnx_out), "torchscript": _max_gaps(eager, ts_out)}
    worst = max(max(g.values()) for g in gaps.values())
    if not worst <= PARITY_ATOL:
        raise RuntimeError(f"exported graph disagrees with eager PyTorch beyond {PARITY_ATOL}: {gaps}")
    return gaps


def export_model(model: str, out_dir: str | Path, *, check: bool = True) -> dict[str, Any]:
    """``c2p export``: write model.onnx, model.ts and card.json for a variant name or a checkpoint."""
    config, weights, source_card = resolve(model)
    if weights is None:
        log.warning("no trained weights for %s: exporting a freshly initialised network", config.name)
        weights_info: dict[str, Any] = {"source": "random-init"}
    else:
        weights_info = {"source": str(weights.name), "sha256": sha256_file(weights)}
        weights_info.update({k: v for k, v in source_card.items() if k not in ("config", "sha256")})
    network = build_c2p(config, checkpoint=weights).eval()
    graph = ServingGraph(network).eval()
    card = build_card(config, weights_info)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    example = probe_batch(config.input_size)
    export_onnx(graph, example, out / ONNX_FILE, card)
    export_torchscript(graph, example, out / TORCHSCRIPT_FILE, card)
    full = dict(card)
    full["artifacts"] = {name: {"sha256": sha256_file(out / name)} for name in (ONNX_FILE, TORCHSCRIPT_FILE)}
    full["digest"] = full["artifacts"][ONNX_FILE]["sha256"]
    if check:
        full["parity"] = verify(out, graph, example)
    (out / CARD_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return full
