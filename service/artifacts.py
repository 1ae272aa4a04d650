"""Turn ``C2P_MODEL`` (a variant, a checkpoint or an export folder) into an export folder on disk.

Exports are cached by weights digest, so a restart reuses the artifact instead of re-exporting, and a
new checkpoint under the same name can never be served from a stale export.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def ensure_artifact(model: str, cache_dir: Path) -> Path:
    """An export folder for ``model``, exporting into ``cache_dir`` once if needed.

    torch is imported only when an export is needed: a worker given an export folder runs without it.
    """
    from models.files import CARD_FILE

    given = Path(model)
    if (given / CARD_FILE).is_file():
        return given
    from models.checkpoint import resolve
    from models.export import export_model
    from models.files import sha256_file

    config, weights, _ = resolve(model)
    tag = sha256_file(weights)[:16] if weights is not None else "random-init"
    target = cache_dir / f"{config.name}-{tag}"
    if (target / CARD_FILE).is_file():
        return target
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
