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
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models import recipe as recipes

from . import ct, dermoscopy, endoscopy, histology, lesions, mri, oct, ultrasound, xray
from .common import Case, CaseContext
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


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task: what it stands in for, how it is labelled and how it is rendered."""

    name: str
    dataset_id: int  # 101.. training tasks, 201.. zero-shot
    dataset_name: str  # CamelCase part of the folder name
    modality: str  # ultrasound | ct | mri | oct | histology | endoscopy | dermoscopy | xray
    target: str
    organ: str
    rgb: bool
    split: str  # "train" | "zero-shot"
    description: str
    stands_in_for: str
    channel: str  # nnU-Net channel name of grey tasks (US, CT, MRI, OCT, XRAY)
    render: Callable[[CaseContext], Case] = field(repr=False, compare=False)
    empty_fraction: float = 0.2
    concept: str = ""  # what the model says it segmented (the semantic targets name it, serving reads it out)

    @property
    def folder(self) -> str:
        return dataset_folder_name(self)

    @property
    def channel_names(self) -> dict[str, str]:
        return {"0": "R", "1": "G", "2": "B"} if self.rgb else {"0": self.channel}


def dataset_folder_name(spec: TaskSpec) -> str:
    return f"Dataset{spec.dataset_id:03d}_{spec.dataset_name}"


_SPECS = [
    TaskSpec(
        "oct_lesion",
        101,
        "OCTLesion",
        "oct",
        "retinal lesion",
        "retina",
        False,
        "train",
        "Retinal OCT B-scan with layered retina and speckle; target: fluid or lesion pockets "
        "(subretinal fluid, pigment-epithelial detachment, intraretinal cysts, hyper-reflective material).",
        "AMD-SD",
        "OCT",
        oct.render,
        concept="retinal lesion on OCT",
    ),
    TaskSpec(
        "brain_mri_tumour",
        102,
        "BrainMRITumour",
        "mri",
        "brain tumour",
        "brain",
        False,
        "train",
        "T1 brain MRI slice of the MNI152 template with scalp and skull; target: a synthetic tumour "
        "(necrotic core with enhancing rim, enhancing extra-axial mass or non-enhancing mass). Training: "
        "axial slices of a central slab; test: held-out axial, coronal and sagittal slices.",
        "BTD",
        "MRI",
        mri.render,
        concept="brain lesion on MR",
    ),
    TaskSpec(
        "histology_glands",
        103,
        "HistologyGlands",
        "histology",
        "gland",
        "colon",
        True,
        "train",
        "H&E colorectal histology; target: glands (lumen with epithelium and basal nuclei), several "
        "per image; distractors: stroma, lymphoid aggregates, vessels, vacuoles, tears.",
        "EBHI",
        "RGB",
        histology.render,
        concept="glands in histology",
    ),
    TaskSpec(
        "thyroid_us_nodule",
        104,
        "ThyroidUSNodule",
        "ultrasound",
        "thyroid nodule",
        "thyroid",
        False,
        "train",
        "Transverse thyroid ultrasound (speckle, attenuation, shadowing); target: the nodule "
        "(hypo/iso/hyperechoic, halo, cystic parts, calcifications); distractors: carotid, jugular, "
        "trachea, oesophagus, muscles.",
        "TNUI",
        "US",
        ultrasound.render_thyroid,
        concept="thyroid nodule on ultrasound",
    ),
    TaskSpec(
        "colonoscopy_polyp",
        105,
        "ColonoscopyPolyp",
        "endoscopy",
        "polyp",
        "colon",
        True,
        "train",
        "Colonoscopy frame lit from the scope (folds, vessels, highlights, vignette); target: the polyp "
        "(sessile, pedunculated or flat); distractors: folds, lumen, debris, bubbles.",
        "Kvasir-SEG/CVC polyp sets",
        "RGB",
        endoscopy.render,
        concept="polyp in colonoscopy",
    ),
    TaskSpec(
        "ct_lung_infection",
        106,
        "CTLungInfection",
        "ct",
        "lung infection",
        "lung",
        False,
        "train",
        "Axial chest CT in a lung window; target: ground-glass, crazy-paving and consolidation patches "
        "inside the lungs; distractors: vessels, heart, bones, dependent density.",
        "COVID-19 CT lung infection",
        "CT",
        ct.render,
        concept="lung infection on CT",
    ),
    TaskSpec(
        "breast_us_lesion",
        107,
        "BreastUSLesion",
        "ultrasound",
        "breast lesion",
        "breast",
        False,
        "train",
        "Breast ultrasound with skin, fat lobules, fibroglandular layer, pectoralis and ribs; target: the "
        "lesion (spiculated hypoechoic mass with shadowing, oval circumscribed mass or cyst with enhancement).",
        "BUSI",
        "US",
        ultrasound.render_breast,
        concept="breast lesion on ultrasound",
    ),
    TaskSpec(
        "dermoscopy_lesion",
        108,
        "DermoscopyLesion",
        "dermoscopy",
        "skin lesion",
        "skin",
        True,
        "train",
        "Dermoscopy of skin; target: the pigmented lesion (irregular border, colour variegation, pigment "
        "network, globules); distractors: hairs, freckles, bubbles, ink, vignetting.",
        "ISIC 2018",
        "RGB",
        dermoscopy.render,
        concept="skin lesion in dermoscopy",
    ),
    TaskSpec(
        "mr_brain_lesion",
        109,
        "MRBrainLesion",
        "mri",
        "brain lesion",
        "brain",
        False,
        "train",
        "Domain-randomised: a random target (any size from 0.05 % to 40 %, eight shape families, bright, dark or "
        "iso-intense with a rim, random edge and texture) in the brain of the MNI152 T1 (all three planes) or of "
        "pydicom-data's small head MR (one case in five); MR "
        "acquisition (bias field, gamma, ghosting, Rician noise). One case in five has no target.",
        "brain lesions of any kind",
        "MRI",
        lesions.render_mr,
        concept="brain lesion on MR",
    ),
    TaskSpec(
        "ct_lesion",
        110,
        "CTLesion",
        "ct",
        "lesion",
        "body",
        False,
        "train",
        "Domain-randomised: a random target in soft tissue of pydicom's head and body CTs (random crops) or in a "
        "rendered chest CT, painted in HU; CT noise and blur. One case in five has no target.",
        "focal lesions on CT",
        "CT",
        lesions.render_ct,
        concept="lesion on CT",
    ),
    TaskSpec(
        "us_lesion",
        111,
        "USLesion",
        "ultrasound",
        "lesion",
        "soft tissue",
        False,
        "train",
        "Domain-randomised: a random target in the tissue of a rendered thyroid or breast scan, with speckle. One "
        "case in five has no target.",
        "focal lesions on ultrasound",
        "US",
        lesions.render_us,
        concept="lesion on ultrasound",
    ),
    TaskSpec(
        "colour_lesion",
        112,
        "ColourLesion",
        "histology",
        "lesion",
        "tissue",
        True,
        "train",
        "Domain-randomised: a random coloured target on scikit-image's stained section and retina photograph, or a "
        "rendered skin, colon or gland scene without its own target. One case in five has no target.",
        "focal findings in colour images",
        "RGB",
        lesions.render_colour,
        concept="lesion in a colour image",
    ),
    TaskSpec(
        "thyroid_us_tn3k",
        201,
        "ThyroidUSTN3K",
        "ultrasound",
        "thyroid nodule",
        "thyroid",
        False,
        "zero-shot",
        "Thyroid nodule ultrasound from another scanner: higher gain, coarser speckle, deeper field of view, "
        "lower dynamic range, heavier smoothing.",
        "TN3K",
        "US",
        ultrasound.render_thyroid_tn3k,
        concept="thyroid nodule on ultrasound",
    ),
    TaskSpec(
        "dermoscopy_ph2",
        202,
        "DermoscopyPH2",
        "dermoscopy",
        "skin lesion",
        "skin",
        True,
        "zero-shot",
        "Dermoscopy from another dermatoscope: round field of view, warm colour calibration, even lighting, "
        "centred lesions.",
        "PH2",
        "RGB",
        dermoscopy.render_ph2,
        concept="skin lesion in dermoscopy",
    ),
    TaskSpec(
        "xray_lungs",
        203,
        "XRayLungs",
        "xray",
        "lung field",
        "lung",
        False,
        "zero-shot",
        "PA chest radiograph (unseen modality); target: both lung fields; distractors: ribs, clavicles, "
        "heart, spine, diaphragm, gastric bubble. Every case has lungs (no empty masks).",
        "Montgomery X-ray",
        "XRAY",
        xray.render,
        0.0,
        concept="lung fields on chest X-ray",
    ),
]
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}


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
