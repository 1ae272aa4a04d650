"""Take the shipped weights out of an ONNX export, so the package can carry the serving graph (models.restore).

Each float initializer of the exported graph is looked up among the checkpoint's tensors by value: the
tensor of the same name, or any tensor of the same shape (or, for a matrix, of the transposed shape) whose
float32 upcast is bitwise equal. Those become external-data references into ``weights.bin`` at the offsets
``models.restore.weights_data`` writes them to; initializers the exporter computed itself (a conv with its
BatchNorm folded in, index tables, constants) match nothing and stay inside the graph. Matching by value
rather than by name means no exporter's naming scheme has to be trusted, and a wrong match is impossible:
equal bytes are the same weights.

The stripped graph is then restored and run beside the full export on the probe batch: outputs must be
identical, bit for bit, or nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from models.files import CARD_FILE, ONNX_FILE, ONNX_METADATA_KEY, WEIGHTS_DATA_FILE, sha256_file
from models.restore import EXPORT_CARD_SUFFIX, align, restore_export, weights_data


def _match(array: np.ndarray, name: str, tensors: dict[str, np.ndarray]) -> tuple[str, bool] | None:
    """``(key, transposed)`` of the checkpoint tensor equal to ``array``, preferring the same name."""
    named = [k for k in (name, name.removeprefix("network.")) if k in tensors]
    others = [k for k in tensors if k not in named]
    for key in named + others:
        tensor = tensors[key]
        for transposed in (False, True) if tensor.ndim == 2 else (False,):
            candidate = tensor.T if transposed else tensor
            if candidate.shape == array.shape and np.array_equal(candidate.astype(np.float32), array):
                return key, transposed
    return None


def strip_weights(export_dir: Path, weights: Path, graph_out: Path) -> dict[str, Any]:
    """Write ``graph_out`` (the export's ONNX graph without the checkpoint's tensors) and its export card.

    Returns the card (also written as ``<graph_out stem>.export.json``).
    """
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    card = json.loads((export_dir / CARD_FILE).read_text())
    if card["weights"].get("sha256") != sha256_file(weights):
        raise ValueError(f"{export_dir} was exported from other weights than {weights}")
    model = onnx.load(str(export_dir / ONNX_FILE))
    tensors = {k: v for k, v in load_file(str(weights)).items() if np.issubdtype(v.dtype, np.floating)}
    entries: list[dict[str, Any]] = []
    offset = 0
    for initializer in model.graph.initializer:
        if initializer.data_type != onnx.TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(initializer)
        found = _match(array, initializer.name, tensors)
        if found is None:
            continue
        offset = align(offset)
        key, transposed = found
        entries.append(
            {
                "name": initializer.name,
                "key": key,
                "transpose": transposed,
                "shape": list(array.shape),
                "offset": offset,
            }
        )
        initializer.ClearField("raw_data")
        initializer.ClearField("float_data")
        initializer.data_location = onnx.TensorProto.EXTERNAL
        del initializer.external_data[:]
        for field, value in (("location", WEIGHTS_DATA_FILE), ("offset", offset), ("length", array.nbytes)):
            item = initializer.external_data.add()
            item.key, item.value = field, str(value)
        offset += array.nbytes
    layout: dict[str, Any] = {"file": WEIGHTS_DATA_FILE, "bytes": offset, "tensors": entries}
    layout["sha256"] = hashlib.sha256(weights_data(load_file(str(weights)), layout)).hexdigest()
    # The graph names the exact bytes of its weights, so its own digest (the model version) covers them.
    embedded = next(p for p in model.metadata_props if p.key == ONNX_METADATA_KEY)
    embedded.value = json.dumps(
        {**json.loads(embedded.value), "weights_data": {"file": WEIGHTS_DATA_FILE, "sha256": layout["sha256"]}},
        sort_keys=True,
    )
    graph_out.parent.mkdir(parents=True, exist_ok=True)
    graph_out.write_bytes(model.SerializeToString())
    digest = sha256_file(graph_out)
    stripped = {k: v for k, v in card.items() if k not in ("artifacts", "digest")}
    stripped.update(
        artifacts={ONNX_FILE: {"sha256": digest}, WEIGHTS_DATA_FILE: {"sha256": layout["sha256"]}},
        digest=digest,
        weights_data=layout,
    )
    card_out = graph_out.with_name(graph_out.stem + EXPORT_CARD_SUFFIX)
    card_out.write_text(json.dumps(stripped, indent=2, sort_keys=True) + "\n")
    try:
        stripped["restored_parity"] = _check_restored(export_dir, weights, graph_out, card_out)
    except BaseException:
        graph_out.unlink(missing_ok=True)
        card_out.unlink(missing_ok=True)
        raise
    card_out.write_text(json.dumps(stripped, indent=2, sort_keys=True) + "\n")
    return stripped


def _check_restored(export_dir: Path, weights: Path, graph: Path, card: Path) -> dict[str, float]:
    """Restore into a temporary folder and run it beside the full export: every output must be identical."""
    import onnxruntime as ort

    from models.export import probe_batch

    config = json.loads(card.read_text())["config"]
    example = probe_batch(int(config["input_size"])).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        restored = restore_export(weights, graph, card, Path(tmp) / "restored")
        outputs = []
        for folder in (export_dir, restored):
            session = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
            outputs.append(session.run(None, {session.get_inputs()[0].name: example}))
        shutil.rmtree(restored, ignore_errors=True)
    gaps = {
        spec.name: float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
        for spec, a, b in zip(session.get_outputs(), *outputs, strict=True)
    }
    if any(gap != 0 for gap in gaps.values()):
        raise RuntimeError(f"the restored graph differs from the export it was stripped from: {gaps}")
    return gaps


def ship_graph(weights: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """Export the checkpoint ``weights`` and strip it into ``<out_dir>/<stem>.onnx`` (default: beside it)."""
    from models.export import export_model

    out_dir = weights.parent if out_dir is None else out_dir
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = Path(tmp) / "export"
        export_model(str(weights), export_dir)
        return strip_weights(export_dir, weights, out_dir / f"{weights.stem}.onnx")
