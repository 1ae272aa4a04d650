"""The engine protocol: a batch of normalised images in, named outputs out. Nothing else."""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from service.errors import InvalidTensor
from service.worker.engine.artifact import Artifact


class Engine(Protocol):
    artifact: Artifact
    device: str

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images float32 [B, 3, S, S] -> {output name: array with leading dim B}."""
        ...


def check_batch(images: np.ndarray, size: int, max_batch: int) -> np.ndarray:
    """Refuse a malformed batch with a clear message before it reaches a runtime's cryptic error."""
    if not isinstance(images, np.ndarray):
        raise InvalidTensor(f"expected a numpy array, got {type(images).__name__}")
    if images.dtype != np.float32:
        raise InvalidTensor(f"expected float32 images, got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (3, size, size):
        raise InvalidTensor(f"expected images of shape [B, 3, {size}, {size}], got {list(images.shape)}")
    if not 1 <= images.shape[0] <= max_batch:
        raise InvalidTensor(f"batch of {images.shape[0]} outside 1..{max_batch}")
    if not np.isfinite(images).all():
        raise InvalidTensor("images contain NaN or infinity")
    return np.ascontiguousarray(images)


def warm_up(engine: Engine, batch_sizes: tuple[int, ...]) -> dict[int, float]:
    """Run each batch size once so the first real request pays no allocation or autotuning cost.

    Returns seconds per batch size, reported at start-up so a slow warm-up is visible.
    """
    size = engine.artifact.input_size
    timings = {}
    for batch in batch_sizes:
        start = time.perf_counter()
        engine.run(np.zeros((batch, 3, size, size), dtype=np.float32))
        timings[batch] = time.perf_counter() - start
    return timings
