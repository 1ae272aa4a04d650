"""File names and digests of checkpoints and exports, without torch.

A worker serving an export folder reads these and needs nothing else from ``models``; keeping them
here lets it run without importing torch (seconds of start-up and hundreds of MB per process).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.ts"
CARD_FILE = "card.json"
ONNX_METADATA_KEY = "c2p.card"
TORCHSCRIPT_CARD_FILE = "card.json"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
