"""The models one worker holds: each an engine with the name and version it is served under.

A worker may hold several (a repository's versions side by side, within ``worker.memory_budget_mb``); each has its
own stream, its lane, named after its artifact digest, so a job only ever reaches a worker that loaded its model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import Settings
from service.errors import ServiceError
from service.queue.keys import lane_of
from service.repository import VERSION_DIGITS, ModelEntry, describe, entries, narrow
from service.worker.engine import Engine, load_engine, warm_up

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Resident memory of a loaded ONNX or TorchScript model relative to its files on disk: the weights once, plus the
# runtime's arena and the activations of a batch. A planning figure for the budget, not a measurement.
MEMORY_FACTOR = 3.0


@dataclass(frozen=True)
class LoadedModel:
    engine: Engine
    name: str
    version: str
    default: bool = False

    @property
    def digest(self) -> str:
        return self.engine.artifact.digest

    @property
    def lane(self) -> str:
        return lane_of(self.digest)

    def announcement(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "digest": self.digest, "default": self.default}


def served_as(engine: Engine, entry: ModelEntry | None = None) -> LoadedModel:
    """An engine under its repository name and version, or (the ``C2P_MODEL`` model) under its variant and digest."""
    if entry is not None and entry.name and entry.version:
        return LoadedModel(engine, entry.name, entry.version, entry.default)
    name = str(engine.artifact.card.get("variant") or "c2p")
    return LoadedModel(engine, name, engine.artifact.digest[:VERSION_DIGITS], True if entry is None else entry.default)


def footprint_mb(engine: Engine) -> float:
    """What the budget counts for a model: its artifact files times MEMORY_FACTOR."""
    directory = Path(engine.artifact.directory)
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name != "card.json")
    return MEMORY_FACTOR * size / MIB


def load_models(settings: Settings, load: Any = None) -> list[LoadedModel]:
    """Every model this worker serves: ``C2P_MODEL`` and the repository's, narrowed by ``worker.models``.

    A repository model that cannot be loaded (a broken export, a digest that does not match) is left out with an
    error in the log and the others are served; the ``C2P_MODEL`` model and a model named in ``worker.models`` must
    load, and the whole set must fit ``worker.memory_budget_mb``."""
    load = load or load_warm_engine
    available = entries(settings.model, settings.model_repository)
    described = describe(available[0], settings.engine.kind) or {}  # the default model's name, from its card
    chosen = narrow(available, settings.worker.models, described.get("name"))
    explicit = bool(settings.worker.models and settings.worker.models.strip())
    loaded: list[LoadedModel] = []
    lanes: set[str] = set()
    for entry in chosen:
        try:
            engine = load(entry.source, settings)
        except ServiceError as err:
            if entry.default or explicit:
                raise
            log.error("model %s not served: %s", entry.label(), err.message)
            continue
        model = served_as(engine, entry)
        if model.lane in lanes:
            log.warning("model %s has the same artifact as one already loaded; serving it once", model.name)
            continue
        lanes.add(model.lane)
        loaded.append(model)
    budget = settings.worker.memory_budget_mb
    if budget is not None:
        used = {f"{m.name}:{m.version}": footprint_mb(m.engine) for m in loaded}
        if sum(used.values()) > budget:
            listed = ", ".join(f"{k} {v:.0f} MB" for k, v in used.items())
            raise ValueError(
                f"the models need about {sum(used.values()):.0f} MB ({listed}), over worker.memory_budget_mb "
                f"{budget}: narrow C2P_WORKER__MODELS or run another worker pool"
            )
    return loaded


def load_warm_engine(source: str, settings: Settings) -> Engine:
    from service.worker.artifacts import ensure_artifact

    directory = ensure_artifact(source, settings.artifacts_dir, settings.engine.kind)
    engine = load_engine(directory, settings.engine)
    if settings.engine.warmup:
        timings = warm_up(engine, (1, settings.engine.max_batch_size))
        log.info("engine %s warm: %s", directory.name, {k: round(v, 3) for k, v in timings.items()})
    return engine
