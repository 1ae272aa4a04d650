"""The synthetic universal benchmark: deterministic, in nnU-Net v2 raw layout, varied and learnable-looking."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.data.synth import TASKS, case_id, generate_case, write_benchmark
from models.data.synth import mri as synth_mri
from models.data.synth.common import CaseContext

SMALL = 64
TINY_TASKS = ["oct_lesion", "dermoscopy_lesion", "brain_mri_tumour", "xray_lungs"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    write_benchmark(out, seed=0, n_train=3, n_test=2, size=SMALL, tasks=TINY_TASKS)
    return out


def test_registry_covers_the_c2p_benchmark() -> None:
    train = [t for t in TASKS.values() if t.split == "train"]
    zero = [t for t in TASKS.values() if t.split == "zero-shot"]
    assert len(train) >= 8 and len(zero) >= 3
    assert len({t.modality for t in train}) >= 7
    assert {"thyroid_us_tn3k", "dermoscopy_ph2", "xray_lungs"} <= {t.name for t in zero}
    assert len({t.dataset_id for t in TASKS.values()}) == len(TASKS)
    for t in TASKS.values():
        assert (100 < t.dataset_id < 200) == (t.split == "train")
        assert re.fullmatch(r"Dataset\d{3}_[A-Za-z0-9]+", t.folder)
        assert t.target and t.organ and t.description
        assert t.channel_names == ({"0": "R", "1": "G", "2": "B"} if t.rgb else {"0": t.channel})


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_renders_finite_images_of_the_right_kind(task: str) -> None:
    spec = TASKS[task]
    for i in range(2):
        case = spec.render(CaseContext(np.random.default_rng([5, i]), SMALL, i == 0, "test", i))
        assert np.isfinite(case.image).all()
        assert case.image.shape == ((SMALL, SMALL, 3) if spec.rgb else (SMALL, SMALL))
        image, mask, meta = generate_case(task, 0, "test", i, size=SMALL)
        assert image.dtype == np.uint8 and mask.dtype == np.uint8
        assert image.shape == ((SMALL, SMALL, 3) if spec.rgb else (SMALL, SMALL))
        assert mask.shape == (SMALL, SMALL) and set(np.unique(mask)) <= {0, 1}
        assert image.std() > 5 or meta.get("negative") == "blank"  # blank only where a blank negative is drawn
        if case.raw is not None:
            assert case.units in ("CT", "MR") and np.isfinite(case.raw).all() and case.raw.shape == (SMALL, SMALL)
        assert meta["case"].startswith(f"{task}_ts_") and meta["empty"] == (not mask.any())


def test_generate_case_is_deterministic_and_seeded() -> None:
    for task in ("thyroid_us_nodule", "colonoscopy_polyp"):
        a = generate_case(task, 3, "train", 7, size=SMALL)
        b = generate_case(task, 3, "tr", 7, size=SMALL)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
        c = generate_case(task, 4, "train", 7, size=SMALL)
        assert not np.array_equal(a[0], c[0])
        d = generate_case(task, 3, "test", 7, size=SMALL)
        assert not np.array_equal(a[0], d[0])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(KeyError):
        generate_case("no_such_task", 0, "train", 0)
    with pytest.raises(ValueError):
        generate_case("oct_lesion", 0, "validation", 0)


def test_empty_masks_and_varied_target_sizes() -> None:
    areas = np.array([generate_case("dermoscopy_lesion", 0, "train", i, size=48)[1].mean() for i in range(60)])
    assert (areas == 0).sum() == 12  # 20 % of cases have no target, two in every block of 10
    present = areas[areas > 0]
    assert present.min() < 0.05 and present.max() > 0.25  # from small lesions to large ones


def _in(index: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(a <= index < b for a, b in ranges)


@pytest.mark.parametrize("task", ["brain_mri_tumour", "mr_brain_lesion"])
def test_mri_trains_on_every_plane_and_tests_on_held_out_slabs(task: str) -> None:
    seen = set()
    for i in range(9):
        _, _, meta = generate_case(task, 0, "train", i, size=SMALL)
        seen.add(meta["plane"])
        assert _in(meta["slice_index"], synth_mri.MNI_TRAIN[meta["plane"]])
        assert re.fullmatch(rf"{task}_tr_\d{{4}}", meta["case"])
    assert seen == {"axial", "coronal", "sagittal"}
    for i in range(9):
        _, _, meta = generate_case(task, 0, "test", i, size=SMALL)
        assert _in(meta["slice_index"], synth_mri.MNI_HELD_OUT[meta["plane"]])
        assert not _in(meta["slice_index"], synth_mri.MNI_TRAIN[meta["plane"]])
    for plane, held in synth_mri.MNI_HELD_OUT.items():  # a gap of at least 3 slices between the two
        for a, b in held:
            assert not any(_in(k, synth_mri.MNI_TRAIN[plane]) for k in range(a - 3, b + 3))


def test_brain_tumour_test_cases_name_their_plane() -> None:
    planes = {}
    for i in range(6):
        _, _, meta = generate_case("brain_mri_tumour", 0, "test", i, size=SMALL)
        planes.setdefault(meta["plane"], []).append(meta)
        assert meta["case"] == case_id("brain_mri_tumour", "test", i, meta["plane"])
        assert f"_ts_{meta['plane']}_{i:04d}" in meta["case"]
    assert set(planes) == {"axial", "coronal", "sagittal"}


def test_mni_anatomy_is_packaged_not_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the MNI template must not be fetched over the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    synth_mri.load_anatomy.cache_clear()
    try:
        anatomy = synth_mri.load_anatomy()
    finally:
        synth_mri.load_anatomy.cache_clear()
    assert anatomy.shape == (3, 197, 233, 189) and anatomy[1].sum() > 1e6  # T1, brain mask, WM - GM


def test_layout_is_nnunet_v2_raw(tiny: Path) -> None:
    bench = json.loads((tiny / "benchmark.json").read_text())
    assert bench["seed"] == 0 and bench["n_train"] == 3 and bench["n_test"] == 2
    assert [d["task"] for d in bench["datasets"]] == TINY_TASKS
    for name in TINY_TASKS:
        spec = TASKS[name]
        folder = tiny / spec.folder
        ds = json.loads((folder / "dataset.json").read_text())
        assert {"channel_names", "labels", "numTraining", "file_ending", "c2p"} <= set(ds)
        assert ds["channel_names"] == spec.channel_names and ds["file_ending"] == ".png"
        assert ds["labels"] == {"background": 0, spec.target: 1}
        c2p = ds["c2p"]
        assert c2p["task"] == name and c2p["modality"] == spec.modality and c2p["split"] == spec.split
        assert c2p["rgb"] == spec.rgb and c2p["target"] == spec.target and c2p["organ"] == spec.organ
        assert c2p["source"]["seed"] == 0 and c2p["source"]["generator"] == "c2p data synth"
        splits = (
            [("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")]
            if spec.split == "train"
            else [("imagesTs", "labelsTs")]
        )
        if spec.split == "zero-shot":  # test images only; the training folders exist (nnU-Net) but stay empty
            assert not any((folder / "imagesTr").iterdir()) and not any((folder / "labelsTr").iterdir())
            assert ds["numTraining"] == 0
        else:
            assert ds["numTraining"] == 3
        for images, labels in splits:
            image_files = sorted((folder / images).iterdir())
            assert len(image_files) == (3 if images == "imagesTr" else 2)
            for path in image_files:
                assert path.name.endswith("_0000.png")
                case = path.name[: -len("_0000.png")]
                tag = "tr" if images == "imagesTr" else "ts"
                assert re.fullmatch(rf"{name}_{tag}(_(axial|coronal|sagittal))?_\d{{4}}", case)
                with Image.open(path) as im, Image.open(folder / labels / f"{case}.png") as lab:
                    assert im.mode == ("RGB" if spec.rgb else "L")
                    assert lab.mode == "L" and lab.size == im.size == (SMALL, SMALL)
                    assert set(np.unique(np.asarray(lab))) <= {0, 1}
    groups = json.loads((tiny / TASKS["brain_mri_tumour"].folder / "dataset.json").read_text())["c2p"]["groups"]
    assert groups["axial"] == ["brain_mri_tumour_ts_axial_0000"]
    assert groups["coronal"] == ["brain_mri_tumour_ts_coronal_0001"]


def test_write_benchmark_is_byte_identical_and_seeded(tiny: Path, tmp_path: Path) -> None:
    again = tmp_path / "b"
    write_benchmark(again, seed=0, n_train=3, n_test=2, size=SMALL, tasks=TINY_TASKS)
    assert _files(tiny) == _files(again)
    other = tmp_path / "c"
    write_benchmark(other, seed=1, n_train=3, n_test=2, size=SMALL, tasks=TINY_TASKS[:2])
    a, c = _files(tiny), _files(other)
    pngs = [k for k in c if k.endswith(".png")]
    assert pngs and all(k in a for k in pngs)
    assert sum(a[k] != c[k] for k in pngs) >= len(pngs) - 2


def test_parallel_generation_matches_serial(tmp_path: Path) -> None:
    kwargs = {"seed": 2, "n_train": 2, "n_test": 1, "size": 48, "tasks": ["breast_us_lesion", "histology_glands"]}
    write_benchmark(tmp_path / "serial", workers=1, **kwargs)
    write_benchmark(tmp_path / "parallel", workers=2, **kwargs)
    assert _files(tmp_path / "serial") == _files(tmp_path / "parallel")


def test_the_project_reader_opens_every_dataset(tiny: Path) -> None:
    layout = pytest.importorskip("models.data.layout")
    for name in TINY_TASKS:
        spec = TASKS[name]
        info, cases = layout.open_dataset(tiny / spec.folder)
        assert (info.task, info.modality, info.split, info.rgb) == (name, spec.modality, spec.split, spec.rgb)
        assert len(cases) == (5 if spec.split == "train" else 2)
        image, mask = layout.load_case(cases[-1], info)
        assert image.shape == (SMALL, SMALL, 3) and mask.shape == (SMALL, SMALL)
    info, _ = layout.open_dataset(tiny / TASKS["brain_mri_tumour"].folder)
    assert info.groups["coronal"] == ("brain_mri_tumour_ts_coronal_0001",)
