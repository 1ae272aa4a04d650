"""``c2p segment INPUT... --out DIR``: the service's pipeline on local files, no server, no Redis.

Each input (a file, or a folder holding one DICOM series) gives ``DIR/<name>.json`` in the result
schema, plus a DICOM SEG, a NIfTI labelmap and/or a PNG overlay when asked. Each format is rendered on its own; one
this input cannot have (a DICOM SEG of a NIfTI: OutputNotAvailable) is skipped with a warning and named under
``"skipped"`` in the input's summary entry, and is no failure. Same decoder, batcher, engine,
report and output writers (service.outputs.formats) as the worker and gateway, so a local run and a served request give
the same files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from service.config import Settings
from service.errors import InvalidRequest, OutputNotAvailable, ServiceError
from service.inputs import Upload
from service.outputs import formats as outputs
from service.worker.batcher import DynamicBatcher
from service.worker.engine import Engine
from service.worker.pipeline import Pipeline

log = logging.getLogger(__name__)

FORMATS = outputs.FORMATS
SUFFIXES = (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".zip")


def output_name(path: Path) -> str:
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def read_input(path: Path) -> list[Upload]:
    """A file, or every file of a folder (a DICOM series, sorted by the decoder, not by name)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise InvalidRequest(f"{path} holds no files")
        return [(p.name, p.read_bytes()) for p in files]
    if not path.is_file():
        raise InvalidRequest(f"{path} does not exist")
    return [(path.name, path.read_bytes())]


def parse_formats(value: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in value.split(",") if f.strip())
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise InvalidRequest(f"unknown format(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(FORMATS)}")
    return formats if "json" in formats else ("json", *formats)


async def _segment_all(
    engine: Engine, settings: Settings, inputs: Sequence[Path], out: Path, formats: Sequence[str],
    modality: str | None, progress: bool,
) -> tuple[list[dict[str, object]], int]:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    executor = ThreadPoolExecutor(settings.worker.decode_threads, thread_name_prefix="c2p-decode")
    batcher = DynamicBatcher(engine.run, settings.engine.max_batch_size, settings.worker.max_queue_delay_ms)
    pipeline = Pipeline(engine, settings, executor, batcher)
    keep = "png" in formats or "dicom-seg" in formats  # what needs more than the result
    summary: list[dict[str, object]] = []
    failures = 0
    try:
        for path in inputs:
            name = output_name(path)
            bar = tqdm(desc=name, unit="slice", disable=not progress, leave=False)

            def advance(done: int, total: int, bar: tqdm = bar) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            try:
                files = read_input(path)
                segmentation = await pipeline.run(files, modality, progress=advance)
            except ServiceError as err:
                failures += 1
                summary.append({"input": str(path), "error": err.body()})
                continue
            finally:
                bar.close()
            result = segmentation.result
            written = [out / f"{name}.json"]
            written[0].write_text(result.model_dump_json(indent=1))
            members = dict(outputs.kept_members(segmentation.volume, result)) if keep else {}
            skipped: dict[str, str] = {}
            error: ServiceError | None = None
            for fmt in formats:  # each on its own: one that cannot be made leaves the others written
                if fmt == "json":
                    continue
                try:
                    data = outputs.render(fmt, result, members, None, settings.seg)
                except OutputNotAvailable as err:  # a format this input cannot have (DICOM SEG of a NIfTI): no failure
                    log.warning("%s: %s skipped: %s", name, fmt, err.message)
                    skipped[fmt] = err.message
                    continue
                except ServiceError as err:
                    error = error or err
                    continue
                written.append(out / f"{name}{outputs.EXTENSIONS[fmt]}")
                written[-1].write_bytes(data)
            entry: dict[str, object] = {"input": str(path), "outputs": [str(p) for p in written]}
            if skipped:
                entry["skipped"] = skipped
            if error is not None:
                failures += 1
                summary.append({**entry, "error": error.body()})
                continue
            reliability = segmentation.result.reliability
            concept = segmentation.result.concept
            summary.append(
                {
                    **entry,
                    "slices": segmentation.result.input.shape[0],
                    "area": sum(s.area for s in segmentation.result.mask.slices),
                    "reliability": reliability.score,
                    "level": reliability.level,
                    **({"reason": reliability.reason} if reliability.reason else {}),
                    "concept": concept.name,
                    "concept_code": f"{concept.code.scheme}:{concept.code.value}",
                    "intended_use": segmentation.result.intended_use,
                }
            )
    finally:
        await batcher.close()
        executor.shutdown(wait=True)
    return summary, failures


def segment(
    engine: Engine, settings: Settings, inputs: Sequence[Path], out: Path, formats: Sequence[str],
    modality: str | None = None, progress: bool = True,
) -> tuple[list[dict[str, object]], int]:  # fmt: skip
    """Segment every input; returns a summary per input and the number that failed (with their errors). A format
    skipped because the input cannot have it does not count as a failure; an input that cannot be read or decoded,
    or any other ServiceError while writing its formats, does."""
    return asyncio.run(_segment_all(engine, settings, inputs, out, formats, modality, progress))
