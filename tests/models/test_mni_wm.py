"""The MNI white-matter dataset: made offline, read back by open_dataset, honest split, same bytes every time."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest

from models.data.layout import load_case, open_dataset
from models.data.mni_wm import DATASET_FOLDER, GAP, TEST_SLAB, axial_split, load_template, write_mni_white_matter

SIZE = 48  # small: the tests check structure and content, not resolution


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("mni-wm tried to reach the network")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built with sockets disabled and an empty nilearn data folder: nothing may be downloaded."""
    nilearn_data = tmp_path_factory.mktemp("nilearn_data")
    load_template.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NILEARN_DATA", str(nilearn_data))
        patch.setattr(socket.socket, "connect", _no_network)
        folder = write_mni_white_matter(tmp_path_factory.mktemp("mni"), size=SIZE, seed=0)
    assert not any(nilearn_data.iterdir())
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_axial_split_keeps_a_gap() -> None:
    train, test = axial_split(25, 143)
    assert len(test) == 3 and all(stop - start + 1 == TEST_SLAB for start, stop in test)
    train_z = {z for start, stop in train for z in range(start, stop + 1)}
    near_test = {z for start, stop in test for z in range(start - GAP, stop + GAP + 1)}
    assert not train_z & near_test and min(train_z) == 25 and max(train_z) == 143
    assert len(train_z) == 119 - 3 * (TEST_SLAB + 2 * GAP)


def test_dataset_reads_back(written: Path) -> None:
    info, cases = open_dataset(written)
    assert written.name == DATASET_FOLDER
    assert (info.task, info.modality, info.target, info.organ, info.split, info.rgb) == (
        "mni_white_matter",
        "mri",
        "white matter",
        "brain",
        "train",
        False,
    )
    train = [c for c in cases if c.split == "train"]
    test = [c for c in cases if c.split == "test"]
    assert 120 <= len(train) <= 200 and set(info.groups) == {"axial", "coronal", "sagittal"}
    assert sorted(c.case_id for c in test) == sorted(i for ids in info.groups.values() for i in ids)
    fractions = []
    for case in cases:
        image, mask = load_case(case, info)
        assert image.shape == (SIZE, SIZE, 3) and image.std() > 0.1
        fractions.append(mask.mean())
    assert min(fractions) > 0.005 and max(fractions) < 0.4 and 0.05 < np.mean(fractions) < 0.3


def test_train_and_test_slices_are_apart(written: Path) -> None:
    spec = json.loads((written / "dataset.json").read_text())
    ranges = spec["c2p"]["slice_ranges"]
    test_z = {int(m[1]) for p in (written / "imagesTs").iterdir() if (m := re.match(r"mni_ax_z(\d+)_", p.name))}
    train_z = {int(m[1]) for p in (written / "imagesTr").iterdir() if (m := re.match(r"mni_ax_z(\d+)", p.name))}
    assert test_z == {z for start, stop in ranges["axial_test"] for z in range(start, stop + 1)}
    assert train_z == {z for start, stop in ranges["axial_train"] for z in range(start, stop + 1)}
    assert min(abs(a - b) for a in train_z for b in test_z) > ranges["gap"] == GAP


def test_deterministic_and_never_replaces_foreign_folders(written: Path, tmp_path: Path) -> None:
    again = write_mni_white_matter(tmp_path / "again", size=SIZE, seed=0)
    assert _files(again) == _files(written)
    foreign = tmp_path / "foreign" / DATASET_FOLDER
    foreign.mkdir(parents=True)
    (foreign / "dataset.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not written by"):
        write_mni_white_matter(tmp_path / "foreign", size=SIZE)
