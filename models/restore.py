"""The shipped serving graph made whole from the shipped float16 weights, with numpy alone.

A full float32 ONNX export of the default model is 37 MB, over the 25 MB a committed file may have, and
exporting it needs torch, which a serving install does not have. So the package ships the graph with its
weights taken out (``<variant>.onnx``, made by ``models.export.strip``): every initializer that is one of
the shipped tensors, upcast to float32 (and transposed where the exporter transposed it), is an ONNX
external-data reference into ``weights.bin``; what the exporter computed (BatchNorm folded into a conv,
constants) stays inside the graph. ``restore_export`` writes ``weights.bin`` from the safetensors file
following the layout in the export card, checks it against the digest the graph itself records, and leaves
an ordinary export folder (``model.onnx``, ``weights.bin``, ``card.json``) that ONNX Runtime loads as if
it had been exported on this machine: the same bytes, so the same outputs, and no torch anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.files import CARD_FILE, ONNX_FILE, WEIGHTS_DATA_FILE, WEIGHTS_DIR, sha256_file

EXPORT_CARD_SUFFIX = ".export.json"
# Tensors start on 64-byte boundaries inside weights.bin: aligned for any SIMD load, little waste.
ALIGNMENT = 64


class RestoreError(ValueError):
    """The shipped graph, its card and the weights beside them do not belong together."""


def align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def shipped_graph(weights: Path) -> tuple[Path, Path] | None:
    """``(graph, export card)`` shipped beside a checkpoint (NAME.onnx + NAME.export.json), if both are there."""
    graph, card = weights.with_suffix(".onnx"), weights.with_name(weights.stem + EXPORT_CARD_SUFFIX)
    return (graph, card) if graph.is_file() and card.is_file() else None


def shipped_variant(variant: str) -> tuple[Path, Path, Path] | None:
    """``(weights, graph, export card)`` for a variant the package ships a graph for."""
    weights = WEIGHTS_DIR / f"{variant}.safetensors"
    found = shipped_graph(weights) if weights.is_file() else None
    return (weights, *found) if found else None


def weights_data(tensors: Mapping[str, np.ndarray], layout: Mapping[str, Any]) -> bytes:
    """The bytes of weights.bin: each entry's tensor as little-endian float32 at its offset, zeros between."""
    data = bytearray(int(layout["bytes"]))
    for entry in layout["tensors"]:
        key = entry["key"]
        if key not in tensors:
            raise RestoreError(
                f"the weights have no tensor {key!r} that the graph's initializer {entry['name']!r} needs"
            )
        array = np.asarray(tensors[key], dtype="<f4")
        if entry["transpose"]:
            array = array.T
        if list(array.shape) != list(entry["shape"]):
            raise RestoreError(f"{key!r} is {list(array.shape)}, the graph expects {entry['shape']}")
        raw = np.ascontiguousarray(array).tobytes()
        start = int(entry["offset"])
        if start % ALIGNMENT or start + len(raw) > len(data):
            raise RestoreError(f"{key!r}: offset {start} does not fit the layout")
        data[start : start + len(raw)] = raw
    return bytes(data)


def restore_export(weights: Path, graph: Path, export_card: Path, target: Path) -> Path:
    """Write the export folder ``target`` from the shipped graph and weights, atomically; returns it.

    Everything is checked before the folder appears: the weights are the ones the card was made from, the
    written weights.bin has the digest the card records. A crash halfway leaves only a staging folder.
    """
    from safetensors.numpy import load_file

    card = json.loads(export_card.read_text())
    layout = card.get("weights_data")
    if not isinstance(layout, dict) or layout.get("file") != WEIGHTS_DATA_FILE:
        raise RestoreError(f"{export_card} has no weights_data layout for {WEIGHTS_DATA_FILE}")
    source = card.get("weights", {}).get("sha256")
    if source != sha256_file(weights):
        raise RestoreError(
            f"{graph.name} was made from other weights than {weights.name}: re-strip the export (c2p ship)"
        )
    data = weights_data(load_file(str(weights)), layout)
    if hashlib.sha256(data).hexdigest() != layout["sha256"]:
        raise RestoreError(f"{WEIGHTS_DATA_FILE} written from {weights.name} does not match {export_card.name}")
    if sha256_file(graph) != card["artifacts"][ONNX_FILE]["sha256"]:
        raise RestoreError(f"{graph} does not match the sha256 in {export_card.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        shutil.copyfile(graph, staging / ONNX_FILE)
        (staging / WEIGHTS_DATA_FILE).write_bytes(data)
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        staging.chmod(0o755)  # mkdtemp's 0o700 would hide the model from a worker running as another user
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / CARD_FILE).is_file():  # another process restored it first: theirs is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
