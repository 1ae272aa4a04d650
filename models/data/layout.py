"""Reading the datasets users bring: nnU-Net v2 raw folders and plain folders of image/mask pairs.

Users' folders are where training breaks first, and a stack trace from deep inside a reader tells them
nothing. So ``open_dataset`` checks the whole structure up front (it lists files and reads only
``dataset.json`` and NIfTI headers), and every problem, then or while loading, is a ``DatasetError``
whose message starts with the path of the file or folder at fault.

Conventions the rest of the project relies on:

- A case is one 2D image. A 3D NIfTI volume becomes one case per slice along ``slice_axis`` (default:
  the last voxel axis, as nnU-Net's 2D configuration slices), with id ``<case>#z<index>``. Slices with
  an empty label are kept: whether to sample them is the trainer's decision.
- NIfTI planes are returned as SimpleITK (and so nnU-Net) index them: rows along the later voxel axis.
  Nothing is reoriented by the affine, so image and label always agree.
- Images come back float32 HxWx3 in [0, 1]; 8-bit pictures are kept as they are (their appearance is the
  signal), deeper ones (16-bit PNG, NIfTI) have no fixed display range and are scaled per plane by the
  0.5/99.5 percentiles, or by the dataset's window when it gives one, else the recipe's CT window for CT
  (models/recipe.py: the one recipe training, evaluation and the service share).
- Masks come back uint8 HxW in {0, 1}; files may hold {0, 1} or {0, 255}, anything else is refused
  rather than guessed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

from models import recipe as recipes

__all__ = [
    "PICTURE_ENDINGS",
    "SUPPORTED_ENDINGS",
    "Case",
    "DatasetError",
    "DatasetInfo",
    "apply_window",
    "find_datasets",
    "load_case",
    "load_image",
    "open_dataset",
    "scale_percentiles",
]

NIFTI_ENDINGS = (".nii.gz", ".nii")
PICTURE_ENDINGS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SUPPORTED_ENDINGS = NIFTI_ENDINGS + PICTURE_ENDINGS
NNUNET_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
# Files a flat pairs folder may carry beside its pictures, and files operating systems drop everywhere.
SIDE_FILE_ENDINGS = (".json", ".txt", ".md", ".csv", ".yaml", ".yml")
JUNK_NAMES = frozenset({"Thumbs.db", "desktop.ini"})
MASK_SUFFIX = "_mask"

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
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_SLICE_TAG = "#z"


class DatasetError(ValueError):
    """A problem with a user's dataset; the message always starts with the file or folder at fault."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is about; ``split`` says whether it is trained on or kept for zero-shot testing."""

    name: str
    root: Path
    task: str
    modality: str
    target: str
    organ: str
    description: str
    split: str
    rgb: bool
    groups: dict[str, tuple[str, ...]]
    layout: str
    slice_axis: int = -1
    window: tuple[float, float] | None = None  # (center, width), applied to NIfTI and deep pictures
    extra: dict[str, Any] = field(default_factory=dict)
    concept: str = ""  # what a model trained on it says it segmented; "<target> on <modality>" when not given

    @property
    def concept_name(self) -> str:
        return self.concept or f"{self.target} on {self.modality}"


@dataclass(frozen=True)
class Case:
    """One 2D item: 1 image file (grey or RGB) or 3 grey channel files, and its label if any."""

    dataset: str
    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None
    split: str  # "train" or "test": where the files lie, not how the dataset is used
    slice_index: int | None = None

    @property
    def source_id(self) -> str:
        """The id of the file the case comes from (a volume's id for its slices), as groups list it."""
        return self.case_id if self.slice_index is None else self.case_id.rsplit(_SLICE_TAG, 1)[0]


@dataclass(frozen=True)
class _Source:
    """One image file set with its label, before volumes are cut into slices."""

    case: str
    images: tuple[Path, ...]
    label: Path | None
    split: str


# ---------------------------------------------------------------------------------------------- paths


def _ending(path: Path) -> str:
    """The file ending, counting ``.nii.gz`` as one; lower case so that ``.PNG`` is recognised."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(_ending(path))]


def _is_junk(path: Path) -> bool:
    return path.name.startswith(".") or path.name in JUNK_NAMES or path.is_dir()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not _is_junk(p))


def _require_dir(path: Path, why: str) -> Path:
    if not path.is_dir():
        raise DatasetError(path, f"folder missing ({why})")
    return path


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turns any reader failure into a DatasetError naming the file: the readers' own messages rarely do."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(path, f"cannot read file ({type(exc).__name__}: {exc})") from exc


def _read_json(path: Path) -> dict[str, Any]:
    with _reading(path):
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # editors on Windows add a BOM
    if not isinstance(data, dict):
        raise DatasetError(path, "must hold a JSON object")
    return data


# ------------------------------------------------------------------------------------------- metadata


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


# -------------------------------------------------------------------------------------- nnU-Net layout


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


def _paired(images: dict[str, Path], labels: dict[str, Path] | None, label_folder: Path, expected: str) -> None:
    """Every image needs its label and every label its image, when there is a label folder at all.

    ``images`` maps case ids to one image file each; ``expected`` formats the label name of a case id.
    """
    if labels is None:
        return
    for case, path in labels.items():
        if case not in images:
            raise DatasetError(path, f"label without image: no image of case '{case}'")
    for case, path in images.items():
        if case not in labels:
            raise DatasetError(path, f"label missing: expected {label_folder / expected.format(case)}")


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


# ---------------------------------------------------------------------------------------- pairs layout


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


def _any_rgb(sources: list[_Source]) -> bool:
    """Whether the dataset is colour, from the first picture's header (decoding pixels is not needed)."""
    first = next((s.images for s in sources if _ending(s.images[0]) in PICTURE_ENDINGS), None)
    if first is None:
        return False
    if len(first) == 3:
        return True
    with _reading(first[0]), Image.open(first[0]) as picture:
        return picture.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr")


def _known_ids(ids: set[str], known: set[str], where: Path, what: str) -> None:
    unknown = sorted(ids - known)
    if unknown:
        raise DatasetError(where, f"{what} lists unknown case ids {unknown[:10]}")


# ------------------------------------------------------------------------------------------- volumes


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    """Trailing length-1 axes beyond two carry nothing: (X, Y, 1) is a 2D image."""
    dims = list(shape)
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    if len(dims) not in (2, 3):
        raise DatasetError(path, f"NIfTI of shape {tuple(shape)} is neither 2D nor 3D")
    return tuple(dims)


def _nifti_shape(path: Path) -> tuple[int, ...]:
    """The spatial shape from the header alone (nibabel loads voxels only when they are sliced)."""
    with _reading(path):
        shape = nib.load(path).shape
    return _spatial_shape(shape, path)


def _cases_of(source: _Source, dataset: str, axis: int) -> list[Case]:
    """A picture or 2D NIfTI is one case; a 3D NIfTI is one case per slice along ``axis``."""
    if _ending(source.images[0]) not in NIFTI_ENDINGS:
        return [Case(dataset, source.case, source.images, source.label, source.split)]
    shape = _nifti_shape(source.images[0])
    for path in (*source.images[1:], *([source.label] if source.label else [])):
        other = _nifti_shape(path)
        if other != shape:
            raise DatasetError(path, f"shape {other} differs from {source.images[0].name}'s {shape}")
    if len(shape) == 2:
        return [Case(dataset, source.case, source.images, source.label, source.split)]
    return [
        Case(dataset, f"{source.case}{_SLICE_TAG}{index}", source.images, source.label, source.split, index)
        for index in range(shape[axis])
    ]


def _nifti_plane(path: Path, slice_index: int | None, axis: int) -> np.ndarray:
    """One plane through the proxy, so only its voxels are read; transposed to SimpleITK's row order."""
    with _reading(path):
        image = nib.load(path)
        spatial = _spatial_shape(image.shape, path)
        index: list[int | slice] = [slice(None)] * len(spatial) + [0] * (len(image.shape) - len(spatial))
        if len(spatial) == 3:
            if slice_index is None:
                raise DatasetError(path, "is a 3D volume but the case has no slice index")
            index[axis % 3] = slice_index
        elif slice_index is not None:
            raise DatasetError(path, f"is 2D but the case asks for slice {slice_index}")
        plane = np.asarray(image.dataobj[tuple(index)])
    return plane.T


# ------------------------------------------------------------------------------------------- pixels


def scale_percentiles(plane: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Maps the [low, high] percentiles to [0, 1]: robust to the few extreme voxels MR and US carry."""
    values = np.nan_to_num(plane.astype(np.float32))
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return recipes.to_unit(values, recipes.Plan("percentile", percentiles=(float(lo), float(hi))))


def apply_window(plane: np.ndarray, center: float, width: float) -> np.ndarray:
    """A CT display window: HU have a fixed meaning, so a fixed window beats per-slice statistics."""
    return recipes.to_unit(np.nan_to_num(plane.astype(np.float32)), recipes.Plan("window", window=(center, width)))


def _scaled(plane: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """The recipe (models/recipe.py) on one deep plane: a dataset's own window, else the recipe's CT window for CT,
    else the recipe's percentiles of the plane (a training case is one slice, as a one-slice upload is)."""
    if info.window:
        return apply_window(plane, *info.window)
    recipe = recipes.Recipe()
    if info.modality == "ct":
        return apply_window(plane, *recipe.ct_window)
    return scale_percentiles(plane, *recipe.percentiles)


def _picture_pixels(path: Path, mask: bool) -> np.ndarray:
    """Decoded pixels: HxW for grey, HxWx3 for colour; a palette mask keeps its indices (nnU-Net's labels)."""
    with _reading(path), Image.open(path) as picture:
        picture.load()
        if picture.mode in ("RGBA", "CMYK", "YCbCr") or (picture.mode == "P" and not mask):
            picture = picture.convert("RGB")
        elif picture.mode in ("LA", "1"):
            picture = picture.convert("L")
        return np.asarray(picture)


def _image_plane(path: Path, case: Case, info: DatasetInfo) -> np.ndarray:
    """Float [0, 1] pixels of one image file: HxW (grey) or HxWx3 (colour)."""
    if _ending(path) in NIFTI_ENDINGS:
        return _scaled(_nifti_plane(path, case.slice_index, info.slice_axis), info)
    pixels = _picture_pixels(path, mask=False)
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    if pixels.ndim == 3:
        raise DatasetError(path, f"colour pictures must be 8-bit, got {pixels.dtype}")
    return _scaled(pixels.astype(np.float32), info)


def load_image(case: Case, info: DatasetInfo) -> np.ndarray:
    """The case's image as float32 HxWx3 in [0, 1]; grey is replicated because C2P reads RGB."""
    planes = [_image_plane(path, case, info) for path in case.image_paths]
    if len(planes) == 1:
        plane = planes[0]
        return np.ascontiguousarray(plane if plane.ndim == 3 else np.repeat(plane[..., None], 3, axis=2))
    for path, plane in zip(case.image_paths, planes, strict=True):
        if plane.ndim != 2 or plane.shape != planes[0].shape:
            first = case.image_paths[0].name
            raise DatasetError(path, f"channel of shape {plane.shape} does not match {first}'s {planes[0].shape}")
    return np.stack(planes, axis=2)


def _binary_mask(values: np.ndarray, path: Path) -> np.ndarray:
    """{0, 1} or {0, 255}; anything else (several classes, JPEG artefacts) is refused, never guessed."""
    present = np.unique(values)
    for allowed in ((0, 1), (0, 255)):
        if np.isin(present, allowed).all():
            return (values == allowed[1]).astype(np.uint8)
    unexpected = [v.item() for v in present if v not in (0, 1, 255)] or [v.item() for v in present]
    raise DatasetError(
        path,
        f"mask must hold only {{0, 1}} or {{0, 255}}; unexpected values {unexpected[:10]}"
        f"{' ...' if len(unexpected) > 10 else ''} (present: {len(present)} distinct values)",
    )


def _mask_plane(path: Path, case: Case, info: DatasetInfo) -> np.ndarray:
    if _ending(path) in NIFTI_ENDINGS:
        return _binary_mask(_nifti_plane(path, case.slice_index, info.slice_axis), path)
    pixels = _picture_pixels(path, mask=True)
    if pixels.ndim == 3:
        if not (pixels == pixels[..., :1]).all():
            raise DatasetError(path, "colour mask whose channels differ; masks must be grey {0, 1} or {0, 255}")
        pixels = pixels[..., 0]
    return _binary_mask(pixels, path)


def load_case(case: Case, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32 HxWx3 in [0, 1]) and mask (uint8 HxW in {0, 1}) of one case, checked against each other."""
    if case.label_path is None:
        kind = "training" if case.split == "train" else "test"
        raise DatasetError(case.image_paths[0], f"label missing for {kind} case '{case.case_id}'")
    image = load_image(case, info)
    mask = _mask_plane(case.label_path, case, info)
    if mask.shape != image.shape[:2]:
        raise DatasetError(
            case.label_path, f"label is {mask.shape} but image {case.image_paths[0].name} is {image.shape[:2]}"
        )
    return image, mask


# ------------------------------------------------------------------------------------------- entry points


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
