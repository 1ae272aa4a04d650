"""One pipeline: decode -> preprocess -> batcher -> engine -> postprocess -> encode.

The worker runs it for queued jobs and ``c2p segment`` runs it for local files, so a result never
depends on how the image arrived. CPU-bound stages (decoding, resizing, RLE) run in a thread pool so
the event loop keeps feeding the batcher; slices of every job in flight share the engine's batches.
A volume is fed in windows of a few batches, so a 300-slice CT never holds all its network inputs at
once, and only the small network-resolution probability of each slice is kept until the volume check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.recipe import Recipe
from service.config import Settings
from service.inputs import Upload, Volume, decode, orientation
from service.inputs.orientation import Plane
from service.ops import tracing
from service.outputs import rle
from service.repository import VERSION_DIGITS
from service.schema import InputInfo, Mask, ModelInfo, SegmentationResult, SliceMask, Timings
from service.worker import preprocess
from service.worker.batcher import DynamicBatcher
from service.worker.engine import Engine
from service.worker.interpret import CardReadout
from service.worker.report import (
    SliceOutputs,
    abstaining,
    build_reliability,
    mask_on_grid,
    slice_parts,
    volume_outliers,
)

Progress = Callable[[int, int], None]  # (slices done, slices in all)


@dataclass
class Segmentation:
    """A result plus the decoded volume, which the derived formats need beyond the JSON (service.outputs.formats)."""

    result: SegmentationResult
    volume: Volume


def model_info(engine: Engine, kind: str, name: str | None = None, version: str | None = None) -> ModelInfo:
    """What a result says of its model: the name and version it was asked for by (a repository's, or the variant and
    the artifact digest's first 12 digits) and the digest of the artifact that ran."""
    card = engine.artifact.card
    return ModelInfo(
        name=name or card["variant"],
        version=version or engine.artifact.digest[:VERSION_DIGITS],
        digest=engine.artifact.digest,
        engine=kind,
    )


class Pipeline:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        executor: Executor,
        batcher: DynamicBatcher,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.executor = executor
        self.batcher = batcher
        self.model = model_info(engine, settings.engine.kind, name, version)
        self.size = engine.artifact.input_size
        self.mean = engine.artifact.card["input"]["mean"]
        self.std = engine.artifact.card["input"]["std"]
        self.recipe = Recipe.from_card(engine.artifact.card["input"].get("recipe"))
        self.readout = CardReadout(engine.artifact.card)
        # Enough slices in flight to fill a few batches; more would only hold memory.
        self.window = max(4, 4 * settings.engine.max_batch_size)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def run(
        self,
        files: Sequence[Upload],
        modality_hint: str | None = None,
        *,
        queued_ms: float = 0.0,
        progress: Progress | None = None,
    ) -> Segmentation:
        start = time.perf_counter()
        with tracing.span("c2p.decode"):
            volume = await self._in_thread(decode, files, self.settings.limits, modality_hint)
            volume = await self._in_thread(reoriented, volume, self.settings.worker.slice_plane)
            plan = await self._in_thread(preprocess.plan, volume, self.size, self.recipe)
        decoded = time.perf_counter()

        with tracing.span("c2p.infer", **{"c2p.slices": volume.shape[0]}):
            outputs = await self._infer(volume, plan, progress)
        inferred = time.perf_counter()

        z, height, width = volume.pixels.shape[:3]
        outliers = volume_outliers(outputs, self.settings.worker.outlier_mads)
        threshold = self.settings.worker.threshold
        suppress = self.settings.worker.suppress_outliers
        parts = slice_parts(outputs)
        abstained = abstaining(outputs, parts, self.readout.abstain_below, threshold)

        letterbox = plan.resize == "letterbox"

        def encode_all() -> list[SliceMask]:
            encoded = []
            for index, out in enumerate(outputs):
                mask = mask_on_grid(out.prob, height, width, threshold, letterbox)
                if (outliers[index] and suppress) or abstained[index]:
                    mask[:] = 0
                coded = rle.encode(mask)
                encoded.append(SliceMask(index=index, counts=coded["counts"], area=int(mask.sum())))
            return encoded

        with tracing.span("c2p.encode"):
            encoded = await self._in_thread(encode_all)
        areas = [s.area for s in encoded]
        report = build_reliability(outputs, areas, outliers, suppress, self.readout.levels, abstained, parts)
        done = time.perf_counter()

        result = SegmentationResult(
            model=self.model,
            input=InputInfo(
                format=volume.format,
                modality=volume.modality,
                shape=(z, height, width),
                channels=3 if volume.pixels.ndim == 4 else 1,
                spacing=volume.spacing,
                orientation=volume.orientation,
                affine=None if volume.affine is None else np.asarray(volume.affine, dtype=float).round(6).tolist(),
                stored_orientation=volume.stored_orientation,
                preprocessing=plan,
            ),
            mask=Mask(size=(height, width), slices=encoded),
            reliability=report,
            timings=Timings(
                queue_ms=round(queued_ms, 2),
                decode_ms=round((decoded - start) * 1000, 2),
                inference_ms=round((inferred - decoded) * 1000, 2),
                encode_ms=round((done - inferred) * 1000, 2),
            ),
            concept=self.readout.concept(outputs, areas),
            intended_use=self.readout.intended_use,
        )
        return Segmentation(result=result, volume=volume)

    async def _infer(self, volume: Volume, plan: Any, progress: Progress | None) -> list[SliceOutputs]:
        """Feed slices to the batcher, at most ``window`` in flight, preparing the next ones meanwhile."""
        total = volume.pixels.shape[0]
        results: list[SliceOutputs | None] = [None] * total
        iterator = preprocess.prepared(volume, plan, self.mean, self.std)
        in_flight: set[asyncio.Task] = set()
        done_count = 0

        async def one(index: int, image: np.ndarray) -> None:
            results[index] = SliceOutputs.from_engine(await self.batcher.submit(image))

        end = object()

        def next_image() -> Any:
            return next(iterator, end)

        try:
            for index in range(total):
                image = await self._in_thread(next_image)
                if image is end:
                    raise RuntimeError(f"preprocessing yielded {index} slices, the volume has {total}")
                if image is None:  # the content gate: nothing to segment, the engine is not asked
                    results[index] = SliceOutputs.for_blank(plan.input_size)
                    done_count += 1
                    continue
                in_flight.add(asyncio.create_task(one(index, image)))
                while len(in_flight) >= self.window:
                    finished, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    done_count += _collect(finished)
                    if progress:
                        progress(done_count, total)
            while in_flight:
                finished, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                done_count += _collect(finished)
                if progress:
                    progress(done_count, total)
        finally:
            for task in in_flight:
                task.cancel()
        return [r for r in results if r is not None]


def reoriented(volume: Volume, plane: Plane) -> Volume:
    """A NIfTI volume in the slicing plane's display convention (service/inputs/orientation.py); others as they are."""
    if volume.format != "nifti" or volume.affine is None:
        return volume
    stored = "".join(orientation.axis_codes(volume.affine))
    pixels, affine, spacing = orientation.canonical(volume.pixels, volume.affine, volume.spacing, plane)
    target = "".join(orientation.PLANES[plane])
    return dataclasses.replace(
        volume,
        pixels=pixels,
        affine=affine,
        spacing=spacing,
        orientation=target,
        stored_orientation=None if stored == target else stored,
    )


def _collect(finished: set[asyncio.Task]) -> int:
    for task in finished:
        task.result()  # re-raise the engine's error for this job
    return len(finished)
