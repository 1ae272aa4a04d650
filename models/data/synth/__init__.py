"""A deterministic synthetic universal benchmark in nnU-Net v2 raw layout (``c2p data synth``).

The real C2P datasets cannot be downloaded here, so each one has a procedural stand-in rendered with
numpy/scipy: the target is defined by the image content of its modality and competes with distractor
structures, with varied shape, size (about 1 % to 40 % of the image), contrast and position, and about
10 % of cases with no target. Eight training tasks cover seven modality styles; three zero-shot tasks
(test images only) change the scanner or the modality. Brain MRI is built on real anatomy (nilearn's
packaged MNI152 template) and its test split adds coronal and sagittal slices to held-out axial ones.

Every case is drawn from its own generator ``np.random.default_rng([seed, dataset_id, split, index])``,
so a case does not depend on how many others are made or in which process, and the same
``(seed, n_train, n_test, size)`` always writes byte-identical files.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from models import recipe as recipes

from . import mri
from .common import CaseContext
from .tasks import TASKS, TaskSpec, dataset_folder_name
from .writer import dataset_json, prepare_dataset_folder, write_case, write_json, write_raw

__all__ = [
    "GENERATOR",
    "SPLITS",
    "TASKS",
    "VERSION",
    "TaskSpec",
    "case_id",
    "dataset_folder_name",
    "generate_case",
    "write_benchmark",
]

GENERATOR = "c2p data synth"
VERSION = "2.0"
SPLITS = {"train": 0, "test": 1}
_SPLIT_ALIASES = {"train": "train", "tr": "train", "test": "test", "ts": "test"}
_SHORT = {"train": "tr", "test": "ts"}


def _split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}") from None


def case_id(task: str, split: str, index: int, plane: str | None = None) -> str:
    """``<task>_<tr|ts>[_<plane>]_<index:04d>``; the plane only for test cases that have one (MRI)."""
    split = _split(split)
    middle = f"_{plane}" if plane and split == "test" else ""
    return f"{task}_{_SHORT[split]}{middle}_{index:04d}"


def _has_target(seed: int, spec: TaskSpec, split: str, index: int) -> bool:
    """Stratified: in every block of 10 consecutive indices, ``round(10 * empty_fraction)`` seeded slots are empty.

    So any 60 test cases hold exactly 6 empty ones (at 10 %), yet each case's flag still depends only on
    ``(seed, task, split, index)``.
    """
    n_empty = round(10 * spec.empty_fraction)
    if n_empty <= 0:
        return True
    block = np.random.default_rng([int(seed), spec.dataset_id, SPLITS[split], int(index) // 10, 10])
    return int(index) % 10 not in block.permutation(10)[:n_empty]


def _render(task: str, seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    image, mask, meta, _ = _render_with_raw(task, seed, split, index, size)
    return image, mask, meta


def _render_with_raw(
    task: str, seed: int, split: str, index: int, size: int
) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray | None]:
    spec = TASKS[task]
    rng = np.random.default_rng([int(seed), spec.dataset_id, SPLITS[split], int(index)])
    rng.random()  # reserved draw (keeps every renderer's stream where it was)
    has_target = _has_target(seed, spec, split, index)
    case = spec.render(CaseContext(rng=rng, size=int(size), has_target=has_target, split=split, index=int(index)))
    if case.raw is not None:  # CT / MR in scanner units: displayed by the recipe, as the service displays a scan
        raw = np.nan_to_num(case.raw.astype(np.float32), nan=0.0)
        case.image = recipes.to_unit(raw, recipes.decide(raw, recipes.Recipe(), modality=case.units))
    img = np.clip(np.nan_to_num(case.image, nan=0.0), 0.0, 1.0)
    image = np.rint(img * 255.0).astype(np.uint8)
    mask = case.mask.astype(np.uint8)
    plane = case.meta.get("plane")
    meta: dict[str, Any] = {
        "case": case_id(task, split, index, plane),
        "task": task,
        "split": split,
        "index": int(index),
        "empty": not bool(mask.any()),
        "area": round(float(mask.mean()), 5),
    }
    meta.update(case.meta)
    if case.raw is not None:
        meta["units"] = case.units
    return image, mask, meta, case.raw


def generate_case(task: str, seed: int, split: str, index: int, size: int = 256) -> tuple[np.ndarray, np.ndarray, dict]:
    """Render one case: image uint8 HxW (grey) or HxWx3 (RGB), mask uint8 HxW in {0, 1}, metadata.

    ``split`` is "train" or "test" (or "tr"/"ts"). The metadata holds the case id, whether the mask is
    empty, the target's area fraction and renderer details (e.g. ``plane`` for MRI).
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if size < 32:
        raise ValueError("size must be at least 32")
    return _render(task, seed, _split(split), index, size)


def _write_one(job: tuple[str, int, str, int, int, str]) -> dict:
    task, seed, split, index, size, folder = job
    image, mask, meta, raw = _render_with_raw(task, seed, split, index, size)
    write_case(Path(folder), split, meta["case"], image, mask)
    if raw is not None and split == "test":  # the scan itself, for evaluation through the service's own path
        write_raw(Path(folder), meta["case"], raw, meta["units"])
    return meta


def _pool_context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def write_benchmark(
    out: Path,
    seed: int = 0,
    n_train: int = 300,
    n_test: int = 60,
    size: int = 256,
    tasks: Sequence[str] | None = None,
    workers: int = 1,
    progress: bool = False,
) -> list[Path]:
    """Write one nnU-Net v2 dataset folder per task under ``out`` and return their paths.

    Training tasks get ``n_train`` training and ``n_test`` test cases; zero-shot tasks only ``n_test``
    test cases (their ``imagesTr``/``labelsTr`` exist but stay empty). ``workers > 1`` renders in that
    many processes; the files are identical either way. Also writes ``out/benchmark.json`` (datasets,
    seed, counts, generator version) and, per dataset, ``c2p_cases.json`` with every case's metadata.
    """
    out = Path(out)
    names = list(TASKS) if tasks is None else list(dict.fromkeys(tasks))
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be >= 0")
    if size < 32:
        raise ValueError("size must be at least 32")
    out.mkdir(parents=True, exist_ok=True)

    jobs: list[tuple[str, int, str, int, int, str]] = []
    folders: dict[str, Path] = {}
    for name in names:
        spec = TASKS[name]
        folder = out / spec.folder
        folders[name] = folder
        splits = ("train", "test") if spec.split == "train" else ("test",)
        prepare_dataset_folder(folder)
        for split in splits:
            count = n_train if split == "train" else n_test
            jobs += [(name, int(seed), split, i, int(size), str(folder)) for i in range(count)]

    metas: list[dict] = []
    report_every = max(len(jobs) // 20, 1)

    def note(done: int) -> None:
        if progress and (done % report_every == 0 or done == len(jobs)):
            print(f"synth: {done}/{len(jobs)} cases", file=sys.stderr, flush=True)

    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
            for meta in pool.map(_write_one, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))):
                metas.append(meta)
                note(len(metas))
    else:
        for job in jobs:
            metas.append(_write_one(job))
            note(len(metas))

    entries = []
    for name in names:
        spec = TASKS[name]
        cases = [m for m in metas if m["task"] == name]
        train = [m["case"] for m in cases if m["split"] == "train"]
        test = [m for m in cases if m["split"] == "test"]
        # The c2p block holds only keys the project's dataset reader knows (models/data/layout.py);
        # provenance goes in "source", which readers keep without interpreting.
        c2p: dict[str, Any] = {
            "task": spec.name,
            "modality": spec.modality,
            "target": spec.target,
            "organ": spec.organ,
            "concept": spec.concept,
            "description": spec.description,
            "split": spec.split,
            "rgb": spec.rgb,
            "source": {
                "generator": GENERATOR,
                "version": VERSION,
                "seed": int(seed),
                "size": int(size),
                "dataset_id": spec.dataset_id,
                "stands_in_for": spec.stands_in_for,
                "cases_file": "c2p_cases.json",
            },
            "notes": f"Synthetic stand-in for {spec.stands_in_for}; {len(train)} training and {len(test)} test "
            "cases; per-case metadata (empty, area, plane, lesion attributes) in c2p_cases.json.",
        }
        if any("plane" in m for m in test):
            groups: dict[str, list[str]] = {plane: [] for plane in mri.PLANES}
            for m in test:
                groups.setdefault(m.get("plane", "unknown"), []).append(m["case"])
            c2p["groups"] = groups
        folder = folders[name]
        write_json(
            folder / "dataset.json",
            dataset_json(
                name=spec.dataset_name,
                description=spec.description,
                channel_names=spec.channel_names,
                target=spec.target,
                num_training=len(train),
                c2p=c2p,
            ),
        )
        write_json(folder / "c2p_cases.json", cases)
        entries.append(
            {
                "task": spec.name,
                "folder": spec.folder,
                "dataset_id": spec.dataset_id,
                "split": spec.split,
                "modality": spec.modality,
                "target": spec.target,
                "rgb": spec.rgb,
                "stands_in_for": spec.stands_in_for,
                "numTraining": len(train),
                "numTest": len(test),
                "empty": sum(m["empty"] for m in cases),
            }
        )
    write_json(
        out / "benchmark.json",
        {
            "generator": GENERATOR,
            "version": VERSION,
            "seed": int(seed),
            "size": int(size),
            "n_train": int(n_train),
            "n_test": int(n_test),
            "datasets": entries,
        },
    )
    return [folders[name] for name in names]
