"""Datasets as users bring them, written tiny in tmp_path: every layout reads, every broken one says where."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from models.data.layout import (
    Case,
    DatasetError,
    find_datasets,
    load_case,
    load_image,
    open_dataset,
    scale_percentiles,
)

RNG = np.random.default_rng(0)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def grey(h: int = 12, w: int = 10) -> np.ndarray:
    return RNG.integers(0, 256, (h, w), dtype=np.uint8)


def square_mask(h: int = 12, w: int = 10, on: int = 255) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[3:8, 2:6] = on
    return mask


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def dataset_json(root: Path, n_train: int, ending: str = ".png", channels: tuple[str, ...] = ("US",), **extra: Any):
    spec = {
        "channel_names": {str(i): name for i, name in enumerate(channels)},
        "labels": {"background": 0, "nodule": 1},
        "numTraining": n_train,
        "file_ending": ending,
        **extra,
    }
    return write_json(root / "dataset.json", spec)


@pytest.fixture
def png_dataset(tmp_path: Path) -> Path:
    """A grey 2D nnU-Net dataset: 2 training cases, 1 labelled test case."""
    root = tmp_path / "Dataset001_Thyroid"
    for case in ("a", "b"):
        write_png(root / "imagesTr" / f"{case}_0000.png", grey())
        write_png(root / "labelsTr" / f"{case}.png", square_mask())
    write_png(root / "imagesTs" / "t_0000.png", grey())
    write_png(root / "labelsTs" / "t.png", square_mask(on=1))
    dataset_json(root, 2)
    return root


def test_png_dataset_reads_with_inferred_metadata(png_dataset: Path) -> None:
    info, cases = open_dataset(png_dataset)
    assert (info.layout, info.name, info.modality, info.target, info.split) == (
        "nnunet",
        "Dataset001_Thyroid",
        "ultrasound",
        "nodule",
        "train",
    )
    assert (info.rgb, info.organ, info.task, info.groups) == (False, "unknown", "dataset001_thyroid", {})
    assert [(c.case_id, c.split) for c in cases] == [("a", "train"), ("b", "train"), ("t", "test")]
    image, mask = load_case(cases[0], info)
    source = np.asarray(Image.open(cases[0].image_paths[0]))
    assert image.dtype == np.float32 and image.shape == (12, 10, 3)
    np.testing.assert_allclose(image[..., 1], source / 255.0, atol=1e-6)
    assert mask.dtype == np.uint8 and mask.sum() == 20 and set(np.unique(mask)) == {0, 1}
    assert load_case(cases[2], info)[1].sum() == 20  # {0, 1} on disk reads the same as {0, 255}


def test_natural_rgb_single_file(tmp_path: Path) -> None:
    root = tmp_path / "polyp"
    rgb = RNG.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    write_png(root / "imagesTr" / "p1_0000.png", rgb)
    write_png(root / "labelsTr" / "p1.png", square_mask(8, 9))
    dataset_json(root, 1, channels=("R", "G", "B"))
    info, cases = open_dataset(root)
    assert info.rgb and cases[0].image_paths == (root / "imagesTr" / "p1_0000.png",)
    np.testing.assert_allclose(load_image(cases[0], info), rgb / 255.0, atol=1e-6)


def test_three_grey_channels_stack_and_two_need_a_choice(tmp_path: Path) -> None:
    root = tmp_path / "mr"
    planes = [grey(6, 7) for _ in range(3)]
    for channel, plane in enumerate(planes):
        write_png(root / "imagesTr" / f"c_{channel:04d}.png", plane)
    write_png(root / "labelsTr" / "c.png", square_mask(6, 7))
    dataset_json(root, 1, channels=("T2", "ADC", "DWI"))
    info, cases = open_dataset(root)
    assert info.modality == "mri" and len(cases[0].image_paths) == 3
    np.testing.assert_allclose(load_image(cases[0], info), np.stack(planes, axis=2) / 255.0, atol=1e-6)

    (root / "imagesTr" / "c_0002.png").unlink()
    dataset_json(root, 1, channels=("T2", "ADC"))
    with pytest.raises(DatasetError, match=r"dataset\.json.*2 channels"):
        open_dataset(root)
    info, cases = open_dataset(root, channels=[1, 0, 0])
    np.testing.assert_allclose(load_image(cases[0], info)[..., 0], planes[1] / 255.0, atol=1e-6)


def write_nifti(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


@pytest.fixture
def volume() -> tuple[np.ndarray, np.ndarray]:
    """A 3D image whose every voxel differs, and a label that is not symmetric in any axis."""
    image = np.arange(7 * 6 * 5, dtype=np.float32).reshape(7, 6, 5)
    label = np.zeros((7, 6, 5), np.uint8)
    label[1:3, 2:5, :] = 1
    label[5, 0, 1] = 1
    return image, label


def nifti_dataset(root: Path, image: np.ndarray, label: np.ndarray, ending: str = ".nii.gz", **c2p: Any) -> Path:
    write_nifti(root / "imagesTr" / f"vol_0000{ending}", image)
    write_nifti(root / "labelsTr" / f"vol{ending}", label)
    dataset_json(root, 1, ending=ending, channels=("CT",), **({"c2p": c2p} if c2p else {}))
    return root


@pytest.mark.parametrize("axis", [-1, 0])
def test_nifti_volume_is_cut_into_slices(tmp_path: Path, volume: tuple[np.ndarray, np.ndarray], axis: int) -> None:
    image, label = volume
    root = nifti_dataset(tmp_path / "ct", image, label, window=[104.5, 209.0], slice_axis=axis)
    info, cases = open_dataset(root)
    assert info.modality == "ct" and info.window == (104.5, 209.0)
    assert [c.case_id for c in cases] == [f"vol#z{i}" for i in range(image.shape[axis])]
    assert {c.source_id for c in cases} == {"vol"}
    for case in cases:
        got_image, got_mask = load_case(case, info)
        expected = np.take(image, case.slice_index, axis=axis).T  # rows along the later voxel axis
        np.testing.assert_allclose(got_image[..., 2], (expected - 0.0) / 209.0, atol=1e-5)
        np.testing.assert_array_equal(got_mask, np.take(label, case.slice_index, axis=axis).T)


def test_nifti_slices_are_listed_from_the_header_alone(tmp_path: Path, volume: tuple[np.ndarray, np.ndarray]) -> None:
    """Voxel data cut off after the header: listing still works, loading says which file is broken."""
    image, label = volume
    root = nifti_dataset(tmp_path / "ct", image, label, ending=".nii")
    path = root / "imagesTr" / "vol_0000.nii"
    path.write_bytes(path.read_bytes()[:400])
    info, cases = open_dataset(root)
    assert len(cases) == 5
    with pytest.raises(DatasetError, match=r"vol_0000\.nii: cannot read"):
        load_case(cases[3], info)


def test_nifti_percentile_scaling_and_2d_nifti(tmp_path: Path) -> None:
    plane = np.arange(1000, dtype=np.float32).reshape(20, 50)
    plane[0, 0] = 1e6  # one outlier must not squash the rest
    scaled = scale_percentiles(plane)
    assert scaled.min() == 0.0 and scaled.max() == 1.0 and 0.4 < float(np.median(scaled)) < 0.6
    root = tmp_path / "xr"
    write_nifti(root / "imagesTr" / "x_0000.nii.gz", plane[..., None])
    write_nifti(root / "labelsTr" / "x.nii.gz", (plane[..., None] > 500).astype(np.uint8))
    dataset_json(root, 1, ending=".nii.gz", channels=("XRAY",))
    info, cases = open_dataset(root)
    assert [c.case_id for c in cases] == ["x"] and info.modality == "xray"
    image, mask = load_case(cases[0], info)
    assert image.shape == (50, 20, 3) and mask.shape == (50, 20) and mask.sum() == 500
    np.testing.assert_allclose(image[..., 0], scaled.T, atol=1e-6)


def test_sixteen_bit_png_is_scaled_by_percentiles(tmp_path: Path) -> None:
    root = tmp_path / "xray"
    deep = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 7).astype(np.uint16)  # 12-bit range
    write_png(root / "images" / "r.png", deep)
    write_png(root / "masks" / "r.png", square_mask(20, 30))
    info, cases = open_dataset(root, modality="X-ray", organ=None)
    assert (info.modality, info.organ) == ("xray", "unknown")
    np.testing.assert_allclose(load_image(cases[0], info)[..., 0], scale_percentiles(deep), atol=1e-6)


def test_c2p_block_and_overrides(png_dataset: Path) -> None:
    c2p = {
        "task": "thyroid_nodule",
        "modality": "US",
        "organ": "thyroid",
        "split": "zero-shot",
        "groups": {"hard": ["b", "t"]},
        "source": "made up",
    }
    dataset_json(png_dataset, 2, c2p=c2p)
    info, _ = open_dataset(png_dataset, organ="neck", description="tiny")
    assert (info.task, info.modality, info.organ, info.description, info.split) == (
        "thyroid_nodule",
        "ultrasound",
        "neck",
        "tiny",
        "zero-shot",
    )
    assert info.groups == {"hard": ("b", "t")} and info.extra == {"source": "made up"}


def test_pairs_folder_with_images_and_masks(tmp_path: Path) -> None:
    root = tmp_path / "skin"
    write_png(root / "images" / "m1.jpg", RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    write_png(root / "images" / "m2.png", grey())
    write_png(root / "masks" / "m1.png", square_mask())
    write_png(root / "masks" / "m2_mask.png", square_mask(on=1))
    write_json(root / "c2p.json", {"modality": "dermoscopy", "target": "lesion", "test_cases": ["m2"]})
    info, cases = open_dataset(root, organ="skin")
    assert (info.layout, info.modality, info.target, info.organ, info.rgb) == (
        "pairs",
        "dermoscopy",
        "lesion",
        "skin",
        True,
    )
    assert [(c.case_id, c.split) for c in cases] == [("m1", "train"), ("m2", "test")]
    assert all(load_case(c, info)[1].sum() == 20 for c in cases)


def test_flat_pairs_folder(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for case in ("x", "y"):
        write_png(root / f"{case}.png", grey())
        write_png(root / f"{case}_mask.png", square_mask())
    (root / "README.txt").write_text("side files are fine")
    info, cases = open_dataset(root)
    assert info.layout == "pairs" and info.modality == "unknown" and [c.case_id for c in cases] == ["x", "y"]
    assert cases[0].label_path == root / "x_mask.png"


def test_find_datasets(tmp_path: Path, png_dataset: Path) -> None:
    (tmp_path / "pairs" / "images").mkdir(parents=True)
    (tmp_path / "pairs" / "labels").mkdir()
    (tmp_path / "nothing" / "deeper").mkdir(parents=True)
    assert find_datasets(tmp_path) == [png_dataset, tmp_path / "pairs"]


# ------------------------------------------------------------------------------------------------ errors


def breaks(root: Path, how: str) -> str:
    """Damages the PNG fixture one way; returns the file name the error must name."""
    if how == "missing label":
        (root / "labelsTr" / "b.png").unlink()
        return "b_0000.png"
    if how == "label without image":
        write_png(root / "labelsTr" / "c.png", square_mask())
        return "c.png"
    if how == "missing keys":
        spec = json.loads((root / "dataset.json").read_text())
        del spec["labels"]
        write_json(root / "dataset.json", spec)
        return "dataset.json"
    if how == "unknown ending":
        dataset_json(root, 2, ending=".mha")
        return "dataset.json"
    if how == "stray file":
        (root / "imagesTr" / "notes.nii.gz").write_bytes(b"")
        return "notes.nii.gz"
    if how == "missing channel":
        dataset_json(root, 2, channels=("T1", "T2", "FLAIR", "ADC"))
        write_png(root / "imagesTr" / "a_0001.png", grey())
        return "a_0000.png"
    if how == "numTraining":
        dataset_json(root, 3)
        return "dataset.json"
    if how == "unknown c2p key":
        dataset_json(root, 2, c2p={"modalty": "ct"})
        return "dataset.json"
    if how == "unknown group case":
        dataset_json(root, 2, c2p={"groups": {"g": ["zz"]}})
        return "dataset.json"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "missing label",
        "label without image",
        "missing keys",
        "unknown ending",
        "stray file",
        "missing channel",
        "numTraining",
        "unknown c2p key",
        "unknown group case",
    ],
)
def test_structure_errors_name_the_file(png_dataset: Path, how: str) -> None:
    name = breaks(png_dataset, how)
    with pytest.raises(DatasetError, match=name.replace(".", r"\.")):
        open_dataset(png_dataset)


def test_no_cases_and_no_dataset(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    dataset_json(root, 0)
    with pytest.raises(DatasetError, match="empty: no cases"):
        open_dataset(root)
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "weights.ckpt").write_bytes(b"")
    with pytest.raises(DatasetError, match="random: not a dataset"):
        open_dataset(tmp_path / "random")


def test_pairs_errors_name_the_file(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    write_png(root / "images" / "a.png", grey())
    write_png(root / "masks" / "a.png", square_mask())
    write_png(root / "images" / "lonely.png", grey())
    with pytest.raises(DatasetError, match=r"lonely\.png: label missing"):
        open_dataset(root)
    (root / "images" / "lonely.png").rename(root / "images" / "lonely.mha")
    with pytest.raises(DatasetError, match=r"lonely\.mha: unknown file ending"):
        open_dataset(root)


def test_loading_errors_name_the_file(png_dataset: Path) -> None:
    info, cases = open_dataset(png_dataset)
    (png_dataset / "imagesTr" / "b_0000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetError, match=r"b_0000\.png: cannot read"):
        load_case(cases[1], info)
    write_png(png_dataset / "labelsTr" / "a.png", square_mask(12, 11))
    with pytest.raises(DatasetError, match=r"a\.png: label is \(12, 11\) but image a_0000\.png is \(12, 10\)"):
        load_case(cases[0], info)
    three_classes = square_mask()
    three_classes[0, 0], three_classes[1, 1] = 1, 2
    write_png(png_dataset / "labelsTr" / "a.png", three_classes)
    with pytest.raises(DatasetError, match=r"a\.png: mask must hold only .* unexpected values \[2\]"):
        load_case(cases[0], info)
    unlabelled = Case(info.name, "a", cases[0].image_paths, None, "train")
    with pytest.raises(DatasetError, match=r"a_0000\.png: label missing for training case"):
        load_case(unlabelled, info)
