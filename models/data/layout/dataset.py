"""The entry points: ``open_dataset`` tells a folder's layout and hands it to that layout's reader;
``find_datasets`` walks a tree for dataset folders.

Kept apart from the readers so that each reader knows only its own layout, and only this module knows them all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from models.data.layout.common import Case, DatasetError, DatasetInfo, _known_ids
from models.data.layout.images import _cases_of
from models.data.layout.nnunet import _open_nnunet
from models.data.layout.pairs import _open_pairs


def open_dataset(path: str | Path, **metadata_overrides: Any) -> tuple[DatasetInfo, list[Case]]:
    """Detects the layout, checks the structure and lists every 2D case, without decoding any pixels.

    ``metadata_overrides`` take the keys of the ``c2p`` block (task, modality, target, organ, description,
    split, rgb, groups, slice_axis, window, channels, ...) and win over the files' own metadata; ``None``
    means "not given", so a CLI can pass its unset options straight through.
    """
    overrides = {key: value for key, value in metadata_overrides.items() if value is not None}
    root = Path(path)
    root = root.parent if root.name in ("dataset.json", "c2p.json") else root
    if not root.is_dir():
        raise DatasetError(root, "dataset folder not found")
    nnunet = (root / "dataset.json").is_file()
    opened = _open_nnunet(root, overrides) if nnunet else _open_pairs(root, overrides)
    if opened is None:
        raise DatasetError(root, "not a dataset: expected dataset.json (nnU-Net v2), images/ + masks/, or X + X_mask")
    info, sources = opened
    cases = [case for source in sources for case in _cases_of(source, info.name, info.slice_axis)]
    if not cases:
        raise DatasetError(root, "no cases found")
    where = root / ("dataset.json" if info.layout == "nnunet" else "c2p.json")
    for name, ids in info.groups.items():
        _known_ids(set(ids), {c.source_id for c in cases} | {c.case_id for c in cases}, where, f"group '{name}'")
    return info, cases


def _looks_like_dataset(files: list[str], dirs: list[str]) -> bool:
    has_masks = "masks" in dirs or "labels" in dirs
    return "dataset.json" in files or "c2p.json" in files or ("images" in dirs and has_masks)


def find_datasets(root: str | Path) -> list[Path]:
    """Every dataset folder under ``root`` (itself included); the walk does not descend into datasets."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "folder not found")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if _looks_like_dataset(files, dirs):
            found.append(Path(folder))
            dirs.clear()
    return sorted(found)
