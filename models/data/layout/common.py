"""What every reader of the dataset layouts shares: the records they return, the error they raise, file names.

``DatasetInfo``, ``Case`` and ``DatasetError`` are what the nnU-Net and pairs readers (and the pixel readers after
them) all speak; keeping them and the file-name helpers here lets each reader import them without importing another.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NIFTI_ENDINGS = (".nii.gz", ".nii")
PICTURE_ENDINGS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SUPPORTED_ENDINGS = NIFTI_ENDINGS + PICTURE_ENDINGS
# Files operating systems drop everywhere.
JUNK_NAMES = frozenset({"Thumbs.db", "desktop.ini"})
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


def _known_ids(ids: set[str], known: set[str], where: Path, what: str) -> None:
    unknown = sorted(ids - known)
    if unknown:
        raise DatasetError(where, f"{what} lists unknown case ids {unknown[:10]}")
