"""The project's own dataset metadata: the ``c2p`` block of dataset.json or a pairs folder's c2p.json, checked
key by key, then merged with what a reader inferred into a ``DatasetInfo``.

Both layouts carry the same block, so its keys, their checks and the merge rule live once, here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.data.layout.common import DatasetError, DatasetInfo

SPLITS = ("train", "zero-shot", "foreign", "negative-healthy", "negative-blank")
TEXT_KEYS = ("name", "task", "modality", "target", "organ", "concept", "description")
# Informational keys: kept in DatasetInfo.extra, never interpreted here.
EXTRA_KEYS = ("source", "license", "reference", "slice_ranges", "notes")
C2P_KEYS = (*TEXT_KEYS, "split", "rgb", "groups", "slice_axis", "window", "channels", "test_cases", *EXTRA_KEYS)


# Words nnU-Net's channel_names (and people) use for a modality, by this project's modality names.
_MODALITY_ALIASES = {
    "ct": ("ct",),
    "mri": ("mri", "mr", "t1", "t1w", "t1ce", "t1gd", "t2", "t2w", "flair", "adc", "dwi"),
    "ultrasound": ("us", "ultrasound"),
    "oct": ("oct",),
    "xray": ("xray", "x-ray", "cxr", "dx", "cr"),
    "histology": ("histology", "histopathology"),
    "endoscopy": ("endoscopy", "colonoscopy"),
    "dermoscopy": ("dermoscopy",),
}
MODALITY_WORDS = {word: modality for modality, words in _MODALITY_ALIASES.items() for word in words}


def _validated_metadata(block: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """Checks a ``c2p`` block (or overrides) key by key, so a typo fails here and not mid-training."""
    unknown = sorted(set(block) - set(C2P_KEYS))
    if unknown:
        raise DatasetError(where, f"unknown c2p metadata keys {unknown}; known keys: {list(C2P_KEYS)}")
    meta = dict(block)
    for key in TEXT_KEYS:
        if key in meta and not isinstance(meta[key], str):
            raise DatasetError(where, f"c2p '{key}' must be a string, got {meta[key]!r}")
    if "modality" in meta:
        meta["modality"] = MODALITY_WORDS.get(meta["modality"].strip().lower(), meta["modality"].strip().lower())
    if "split" in meta and meta["split"] not in SPLITS:
        raise DatasetError(where, f"c2p 'split' must be one of {list(SPLITS)}, got {meta['split']!r}")
    if "rgb" in meta and not isinstance(meta["rgb"], bool):
        raise DatasetError(where, f"c2p 'rgb' must be true or false, got {meta['rgb']!r}")
    if "slice_axis" in meta and (type(meta["slice_axis"]) is not int or not -3 <= meta["slice_axis"] <= 2):
        raise DatasetError(where, f"c2p 'slice_axis' must be an integer in -3..2, got {meta['slice_axis']!r}")
    if "groups" in meta:
        meta["groups"] = _validated_groups(meta["groups"], where)
    if "window" in meta:
        meta["window"] = _validated_window(meta["window"], where)
    for key, sizes in (("channels", (1, 3)), ("test_cases", None)):
        if key in meta:
            meta[key] = _validated_list(meta[key], key, sizes, where)
    return meta


def _validated_groups(groups: Any, where: Path) -> dict[str, tuple[str, ...]]:
    if not isinstance(groups, Mapping) or not all(
        isinstance(ids, list | tuple) and all(isinstance(i, str) for i in ids) for ids in groups.values()
    ):
        raise DatasetError(where, "c2p 'groups' must map group names to lists of case ids")
    return {str(name): tuple(ids) for name, ids in groups.items()}


def _validated_window(window: Any, where: Path) -> tuple[float, float]:
    if isinstance(window, Mapping) and set(window) == {"center", "width"}:
        window = (window["center"], window["width"])
    ok = isinstance(window, list | tuple) and len(window) == 2
    if ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in window) and window[1] > 0:
        return float(window[0]), float(window[1])
    raise DatasetError(where, f"c2p 'window' must be [center, width] with width > 0, got {window!r}")


def _validated_list(values: Any, key: str, sizes: tuple[int, ...] | None, where: Path) -> tuple[Any, ...]:
    kind = int if key == "channels" else str
    ok = isinstance(values, list | tuple) and all(type(v) is kind for v in values)
    ok = ok and (sizes is None or len(values) in sizes) and (kind is str or all(v >= 0 for v in values))
    if not ok:
        what = "1 or 3 channel indices" if key == "channels" else "a list of case ids"
        raise DatasetError(where, f"c2p '{key}' must be {what}, got {values!r}")
    return tuple(values)


def _build_info(root: Path, layout: str, meta: Mapping[str, Any], inferred: Mapping[str, Any]) -> DatasetInfo:
    """Explicit metadata wins over what was inferred, which wins over defaults."""
    merged = {
        "name": root.name,
        "modality": "unknown",
        "target": "foreground",
        "organ": "unknown",
        "description": "",
        "split": "train",
        "rgb": False,
        "groups": {},
        "slice_axis": -1,
        "window": None,
        **inferred,
        **meta,
    }
    return DatasetInfo(
        name=merged["name"],
        root=root,
        task=merged.get("task") or re.sub(r"[^a-z0-9]+", "_", merged["name"].lower()).strip("_"),
        modality=merged["modality"],
        target=merged["target"],
        organ=merged["organ"],
        description=merged["description"],
        split=merged["split"],
        rgb=merged["rgb"],
        groups=dict(merged["groups"]),
        layout=layout,
        slice_axis=merged["slice_axis"],
        window=merged["window"],
        concept=merged.get("concept", ""),
        extra={key: merged[key] for key in EXTRA_KEYS if key in merged},
    )
