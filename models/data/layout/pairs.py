"""Plain folders of image/mask pairs: images/ + masks/ (or labels/), or X + X_mask files side by side.

One reader per layout: this one pairs the files by name; the c2p.json beside them and the pixels are read by the
shared modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.data.layout.common import (
    SUPPORTED_ENDINGS,
    DatasetError,
    DatasetInfo,
    _ending,
    _files,
    _known_ids,
    _paired,
    _read_json,
    _Source,
    _stem,
)
from models.data.layout.images import _any_rgb
from models.data.layout.metadata import _build_info, _validated_metadata

# Files a flat pairs folder may carry beside its pictures.
SIDE_FILE_ENDINGS = (".json", ".txt", ".md", ".csv", ".yaml", ".yml")
MASK_SUFFIX = "_mask"


def _picture_files(folder: Path, strict: bool) -> list[Path]:
    """Image files of a pairs folder; a flat folder may also carry side files (c2p.json, a README)."""
    found = []
    for path in _files(folder):
        if _ending(path) in SUPPORTED_ENDINGS:
            found.append(path)
        elif strict or _ending(path) not in SIDE_FILE_ENDINGS:
            raise DatasetError(path, f"unknown file ending {_ending(path)!r}; supported: {list(SUPPORTED_ENDINGS)}")
    return found


def _by_stem(paths: list[Path], strip_suffix: bool) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for path in paths:
        stem = _stem(path)
        stem = stem[: -len(MASK_SUFFIX)] if strip_suffix and stem.endswith(MASK_SUFFIX) else stem
        if stem in by_stem:
            raise DatasetError(path, f"two files for case '{stem}' (the other is {by_stem[stem].name})")
        by_stem[stem] = path
    return by_stem


def _pairs_folders(root: Path) -> tuple[dict[str, Path], dict[str, Path], Path] | None:
    """Images and masks by case id, from images/ + masks/ (or labels/), or from X + X_mask files."""
    image_dir = root / "images"
    mask_dir = next((root / n for n in ("masks", "labels") if (root / n).is_dir()), None)
    if image_dir.is_dir() and mask_dir is not None:
        images = _by_stem(_picture_files(image_dir, strict=True), strip_suffix=False)
        return images, _by_stem(_picture_files(mask_dir, strict=True), strip_suffix=True), mask_dir
    if not any(_ending(p) in SUPPORTED_ENDINGS and _stem(p).endswith(MASK_SUFFIX) for p in _files(root)):
        return None  # not a pairs folder at all: say so rather than complain about its files
    pictures = _picture_files(root, strict=False)
    masks = [p for p in pictures if _stem(p).endswith(MASK_SUFFIX)]
    images = _by_stem([p for p in pictures if p not in masks], strip_suffix=False)
    return images, _by_stem(masks, strip_suffix=True), root


def _open_pairs(root: Path, overrides: Mapping[str, Any]) -> tuple[DatasetInfo, list[_Source]] | None:
    folders = _pairs_folders(root)
    if folders is None:
        return None
    images, masks, mask_dir = folders
    expected = "{}.<ending>" if mask_dir != root else "{}" + MASK_SUFFIX + ".<ending>"
    _paired(images, masks, mask_dir, expected)
    side = root / "c2p.json"
    meta = _validated_metadata(_read_json(side), side) if side.is_file() else {}
    meta.update(_validated_metadata(overrides, root))
    tests = set(meta.get("test_cases", ()))
    _known_ids(tests, set(images), side, "c2p 'test_cases'")
    sources = [_Source(c, (p,), masks[c], "test" if c in tests else "train") for c, p in sorted(images.items())]
    return _build_info(root, "pairs", meta, {"rgb": _any_rgb(sources)}), sources
