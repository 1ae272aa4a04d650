"""The nnU-Net v2 raw layout: dataset.json, imagesTr/labelsTr (+ imagesTs/labelsTs), ``<case>_XXXX`` files.

One reader per layout: this one checks nnU-Net's own structure and infers what dataset.json says of the modality
and target; the ``c2p`` block and the pixels are read by the shared modules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.data.layout.common import (
    PICTURE_ENDINGS,
    SUPPORTED_ENDINGS,
    DatasetError,
    DatasetInfo,
    _ending,
    _files,
    _paired,
    _read_json,
    _require_dir,
    _Source,
)
from models.data.layout.images import _any_rgb
from models.data.layout.metadata import MODALITY_WORDS, _build_info, _validated_metadata

NNUNET_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _inferred_modality(channel_names: Mapping[str, Any]) -> str:
    """nnU-Net's channel names are often the modality ("CT", "T2", "ADC"); the first one that is wins."""
    for value in channel_names.values():
        word = str(value).strip().lower()
        if word in MODALITY_WORDS:
            return MODALITY_WORDS[word]
    return "unknown"


def _inferred_target(labels: Mapping[str, Any]) -> str:
    return next((str(name) for name, value in labels.items() if value == 1 or value == [1]), "foreground")


def _is_rgb_names(channel_names: Mapping[str, Any]) -> bool:
    return [str(v).strip().upper() for v in channel_names.values()] == ["R", "G", "B"]


def _nnunet_header(root: Path) -> tuple[dict[str, Any], str]:
    """The parts of dataset.json this reader needs, checked; returns the json and the file ending."""
    path = root / "dataset.json"
    spec = _read_json(path)
    missing = [key for key in NNUNET_KEYS if key not in spec]
    if missing:
        raise DatasetError(path, f"missing required keys {missing} (nnU-Net v2 needs {list(NNUNET_KEYS)})")
    ending = spec["file_ending"]
    if not isinstance(ending, str) or ending.lower() not in SUPPORTED_ENDINGS:
        raise DatasetError(path, f"unknown file_ending {ending!r}; supported: {list(SUPPORTED_ENDINGS)}")
    names = spec["channel_names"]
    if not isinstance(names, Mapping) or sorted(names) != [str(i) for i in range(len(names))] or not names:
        raise DatasetError(path, f"channel_names must map '0', '1', ... to names, got {names!r}")
    if not isinstance(spec["labels"], Mapping):
        raise DatasetError(path, f"labels must map label names to values, got {spec['labels']!r}")
    if type(spec["numTraining"]) is not int:
        raise DatasetError(path, f"numTraining must be an integer, got {spec['numTraining']!r}")
    if not isinstance(spec.get("c2p", {}), Mapping):
        raise DatasetError(path, "the c2p block must be a JSON object")
    return spec, ending


def _channel_files(folder: Path, ending: str, n_channels: int) -> dict[str, dict[int, Path]]:
    """``<case>_XXXX<ending>`` files of an images folder, by case then channel."""
    cases: dict[str, dict[int, Path]] = {}
    for path in _files(folder):
        if not path.name.endswith(ending):
            raise DatasetError(path, f"does not end with the dataset's file_ending {ending!r}")
        match = _CHANNEL_FILE.match(path.name[: -len(ending)])
        if match is None:
            raise DatasetError(path, f"image names must be <case>_XXXX{ending} (4-digit channel suffix missing)")
        channel = int(match["channel"])
        if channel >= n_channels:
            raise DatasetError(path, f"channel {channel:04d} but dataset.json declares {n_channels} channel(s)")
        cases.setdefault(match["case"], {})[channel] = path
    return cases


def _case_images(case: str, files: dict[int, Path], n_channels: int, use: tuple[int, ...]) -> tuple[Path, ...]:
    """The channel files a case is read from; natural pictures may hold R, G, B in one ``_0000`` file."""
    first = files[min(files)]
    if set(files) == {0} and n_channels in (1, 3) and _ending(first) in PICTURE_ENDINGS:
        return (first,)
    for channel in range(n_channels):
        if channel not in files:
            expected = f"{case}_{channel:04d}{first.name[len(case) + 5 :]}"
            raise DatasetError(first, f"channel file {expected} missing (dataset.json declares {n_channels})")
    return tuple(files[c] for c in use)


def _channel_selection(spec: Mapping[str, Any], meta: Mapping[str, Any], where: Path) -> tuple[int, ...]:
    """C2P reads 1 (grey) or 3 channels; which of the dataset's channels those are."""
    n_channels = len(spec["channel_names"])
    if "channels" in meta:
        if max(meta["channels"]) >= n_channels:
            raise DatasetError(where, f"c2p 'channels' {list(meta['channels'])} exceed the {n_channels} channel(s)")
        return meta["channels"]
    if n_channels == 2:
        raise DatasetError(
            where,
            '2 channels cannot be read as grey or RGB; choose with "c2p": {"channels": [0]} (one channel) '
            "or e.g. [0, 1, 1] (three)",
        )
    return (0,) if n_channels == 1 else (0, 1, 2)


def _labels_by_case(folder: Path, ending: str) -> dict[str, Path]:
    labels = {}
    for path in _files(folder):
        if not path.name.endswith(ending):
            raise DatasetError(path, f"does not end with the dataset's file_ending {ending!r}")
        labels[path.name[: -len(ending)]] = path
    return labels


def _nnunet_sources(
    root: Path, spec: Mapping[str, Any], ending: str, use: tuple[int, ...]
) -> tuple[list[_Source], int]:
    """All cases of imagesTr (+ labelsTr) and imagesTs (+ optional labelsTs); also the training case count."""
    sources: list[_Source] = []
    n_train = 0
    for split, images_name, labels_name in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        image_folder, label_folder = root / images_name, root / labels_name
        if split == "train":
            _require_dir(image_folder, "nnU-Net v2 training images")
            _require_dir(label_folder, "nnU-Net v2 training labels")
        elif not image_folder.is_dir():
            continue
        cases = _channel_files(image_folder, ending, len(spec["channel_names"]))
        labels = _labels_by_case(label_folder, ending) if label_folder.is_dir() else None
        firsts = {case: files[min(files)] for case, files in cases.items()}
        _paired(firsts, labels, label_folder, "{}" + ending)
        for case, files in sorted(cases.items()):
            images = _case_images(case, files, len(spec["channel_names"]), use)
            sources.append(_Source(case, images, labels[case] if labels else None, split))
        n_train = len(cases) if split == "train" else n_train
    return sources, n_train


def _open_nnunet(root: Path, overrides: Mapping[str, Any]) -> tuple[DatasetInfo, list[_Source]]:
    spec, ending = _nnunet_header(root)
    where = root / "dataset.json"
    meta = {**_validated_metadata(spec.get("c2p", {}), where), **_validated_metadata(overrides, root)}
    sources, n_train = _nnunet_sources(root, spec, ending, _channel_selection(spec, meta, where))
    if n_train != spec["numTraining"]:
        raise DatasetError(where, f"numTraining is {spec['numTraining']} but imagesTr holds {n_train} case(s)")
    inferred = {
        "modality": _inferred_modality(spec["channel_names"]),
        "target": _inferred_target(spec["labels"]),
        "description": str(spec.get("description", "")),
    }
    inferred["rgb"] = _is_rgb_names(spec["channel_names"]) or _any_rgb(sources)
    return _build_info(root, "nnunet", meta, inferred), sources
