"""Turn ``C2P_MODEL`` (a variant, a checkpoint or an export folder) into an export folder on disk.

Two ways, both cached under the weights' digest, so a restart reuses the folder and a new checkpoint
under the same name can never be served from a stale one:

- the package ships the serving graph without its weights beside the checkpoint (models.restore): the
  folder is written from the float16 safetensors with numpy, in well under a second and with no torch;
  this is what a serving install (``.[cpu]`` or ``.[gpu]``) does for the bundled model;
- anything else (a checkpoint with no shipped graph, or the TorchScript engine) is exported with torch,
  which only the ``[train]`` extra installs.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from service.errors import ArtifactNotFound

log = logging.getLogger(__name__)


def ensure_artifact(model: str, cache_dir: Path, kind: str = "onnx") -> Path:
    """An export folder for ``model`` that serves ``kind``, made in ``cache_dir`` once if needed."""
    from models.cards import resolve
    from models.files import CARD_FILE, sha256_file
    from models.restore import restore_export, shipped_graph

    given = Path(model)
    if (given / CARD_FILE).is_file():
        return given
    config, weights, _ = resolve(model)
    tag = sha256_file(weights)[:16] if weights is not None else "random-init"
    shipped = shipped_graph(weights) if weights is not None and kind == "onnx" else None
    if shipped is not None:
        target = cache_dir / f"{config.name}-{tag}-onnx"
        if not (target / CARD_FILE).is_file():
            log.info("writing the shipped graph's weights for %s to %s (once)", config.name, target)
            restore_export(weights, *shipped, target)
        return target
    target = cache_dir / f"{config.name}-{tag}"
    if (target / CARD_FILE).is_file():
        return target
    try:
        from models.export import export_model
    except ModuleNotFoundError as err:  # a serving install: no torch, timm or onnx
        shipped_for = "" if kind == "onnx" else " for the torchscript engine"
        raise ArtifactNotFound(
            f"{model} has no shipped graph{shipped_for}, and exporting one needs torch ({err.name} is not "
            "installed): install the [train] extra, or set C2P_MODEL to an export folder"
        ) from err

    log.info("exporting %s to %s (once; later starts reuse it)", model, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Export beside the target and rename, so a crash mid-export never leaves a half folder to reuse.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        export_model(model, staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
