"""``c2p evaluate --through-service``: the benchmark's test cases as the files a hospital would send, through the
service's own path (decode, recipe, content gate, exported graph in ONNX Runtime, report, RLE).

The card's figures come from ``c2p evaluate`` in PyTorch; this is how to know they are the figures of what the
service does. CT and MR cases go in as the scans behind them (``rawTs/*.nii.gz``, and CT also as a DICOM
instance in Hounsfield units), pictures as their PNG files; each mask comes back by RLE and is scored against
the label at the label's own size.
"""

from __future__ import annotations

import asyncio
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from models.data.layout import find_datasets, open_dataset
from models.files import RAW_FOLDER
from service.config import EngineSettings, Settings
from service.outputs import rle
from service.worker.artifacts import ensure_artifact
from service.worker.batcher import DynamicBatcher
from service.worker.engine import load_engine
from service.worker.pipeline import Pipeline

UNITS = {"ct": "CT", "mri": "MR"}


def ct_dicom(hu: np.ndarray) -> bytes:
    """One CT instance in HU (int16 stored, rescale 1 / 0) with a plane geometry: what a scanner would send."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "EVAL", 1
    ds.Rows, ds.Columns = hu.shape
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.ascontiguousarray(np.rint(hu).astype(np.int16)).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _cases(path: Path, limit: int | None) -> tuple[Any, list[tuple[str, list[tuple[str, str, bytes]], np.ndarray]]]:
    """(info, [(case, [(route, name, bytes)], label)]): every file form a case goes in as."""
    info, cases = open_dataset(path)
    cases = [c for c in cases if c.split == "test" and c.label_path is not None][:limit]
    out = []
    for case in cases:
        label = np.asarray(Image.open(case.label_path)) > 0
        raw = path / RAW_FOLDER / f"{case.case_id}.nii.gz"
        forms = [("png", case.image_paths[0].name, case.image_paths[0].read_bytes())]
        if raw.is_file():
            forms = [("nifti", raw.name, raw.read_bytes())]
            if info.modality == "ct":
                import nibabel as nib

                hu = np.asarray(nib.load(raw).dataobj)[..., 0].T
                forms.append(("dicom", "case.dcm", ct_dicom(hu)))
        out.append((case.case_id, forms, label))
    return info, out


def _dice(pred: np.ndarray, label: np.ndarray) -> float:
    total = pred.sum() + label.sum()
    return 1.0 if total == 0 else float(2 * (pred & label).sum() / total)


async def _run(model: str, datasets: list[Path], limit: int | None) -> dict[str, Any]:
    settings = Settings(model=model, engine=EngineSettings(warmup=False))
    engine = load_engine(ensure_artifact(model, settings.cache_dir), settings.engine)
    executor = ThreadPoolExecutor(2, thread_name_prefix="c2p-eval")
    batcher = DynamicBatcher(engine.run, settings.engine.max_batch_size, settings.worker.max_queue_delay_ms)
    pipeline = Pipeline(engine, settings, executor, batcher)
    report: dict[str, Any] = {}
    try:
        for path in datasets:
            info, cases = _cases(path, limit)
            if not cases:
                continue
            scores: dict[str, list[float]] = {}
            empty: list[bool] = []
            for _, forms, label in cases:
                for route, name, data in forms:
                    result = (await pipeline.run([(name, data)], UNITS.get(info.modality))).result
                    mask = rle.decode({"size": list(result.mask.size), "counts": result.mask.slices[0].counts})
                    pred = mask.astype(bool)
                    if pred.shape != label.shape:
                        raise ValueError(f"{name}: mask {pred.shape} but label {label.shape}")
                    scores.setdefault(route, []).append(_dice(pred, label))
                    if route == forms[0][0]:
                        empty.append(not pred.any())
            report[info.name] = {
                "split": {"train": "in-domain"}.get(info.split, info.split),
                "images": len(cases),
                "dice": {route: float(np.mean(v)) for route, v in scores.items()},
                "empty_predicted": float(np.mean(empty)),
            }
    finally:
        await batcher.close()
        executor.shutdown()
    return report


def evaluate_through_service(
    model: str, data: list[str | Path] | str | Path, out_json: str | Path, limit: int | None = None
) -> dict[str, Any]:
    roots = [data] if isinstance(data, str | Path) else list(data)
    datasets = [p for root in roots for p in (find_datasets(root) if not (Path(root) / "dataset.json").is_file()
                                               else [Path(root)])]  # fmt: skip
    per_dataset = asyncio.run(_run(model, datasets, limit))

    def mean(split: str) -> float | None:
        values = [d["dice"][next(iter(d["dice"]))] for d in per_dataset.values() if d["split"] == split]
        return float(np.mean(values)) if values else None

    report = {
        "model": model,
        "path": "service: decode, recipe, content gate, ONNX Runtime graph, report, RLE",
        "datasets": per_dataset,
        "summary": {
            split.replace("-", "_") + "_mean_dice": mean(split) for split in ("in-domain", "zero-shot", "foreign")
        },
    }
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    return report
