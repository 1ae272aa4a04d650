"""What the service serves and whether it is ready, read from the workers' announcements (service/queue/presence.py).

A gateway knows of models what workers announce (each model's name, version and the digest of the artifact they
run) and what the models' register keeps of them while none runs (service/queue/presence.py). Every API resolves
names by the same rules here: the alias ``c2p`` (or no name) means the default
model (``C2P_MODEL``); a version is a repository version or the first 12 hex digits of the artifact digest, and must
be served exactly (a pinned version nobody serves is a 404, never another version); without one, a request goes to
the newest version served. Readiness is answered the same way: ready while Redis answers and at least one warm
worker has announced itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service import repository
from service.config import Settings
from service.errors import ModelNotFound, Unavailable
from service.queue import JobQueue, presence
from service.queue.keys import lane_of
from service.repository import VERSION_DIGITS, version_key

log = logging.getLogger(__name__)

ALIAS = "c2p"
SERVER_NAME = "c2p-serve"
# Announcements are read with SCAN; an infer request reuses a read this recent instead of scanning per request.
WORKERS_TTL_S = 2.0


@dataclass(frozen=True)
class Version:
    """One model version a warm worker serves: where its jobs go is the lane of its digest."""

    name: str
    version: str
    digest: str
    default: bool = False
    live: bool = True  # a warm worker serves it now (else only the register knows it: jobs wait for a worker)

    @property
    def lane(self) -> str:
        return lane_of(self.digest)

    def matches(self, version: str) -> bool:
        return version in (self.version, self.digest[:VERSION_DIGITS])


@dataclass(frozen=True)
class Served:
    """What a model name resolves to: the canonical name, the versions warm workers serve (oldest first) and the one a
    request goes to (the pinned one, else the newest; None while no worker serves the model)."""

    name: str
    versions: tuple[str, ...]
    target: Version | None = None


def index_entry(version: Version) -> dict[str, Any]:
    """One row of the repository index (Triton's fields: name, version, state, reason; and the digest)."""
    return {
        "name": version.name,
        "version": version.version,
        "digest": version.digest,
        "default": version.default,
        "state": "READY" if version.live else "UNAVAILABLE",
        "reason": "" if version.live else "no warm worker has it loaded; jobs for it wait in its queue",
    }


def server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0"


def _version(model: dict[str, Any], live: bool) -> Version | None:
    try:
        found = Version(
            str(model["name"]), str(model["version"]), str(model["digest"]), bool(model.get("default")), live
        )
        lane_of(found.digest)
    except (KeyError, TypeError, ValueError):
        return None  # a malformed entry serves nothing
    return found


def served_versions(workers: list[dict[str, Any]], register: list[dict[str, Any]] = ()) -> list[Version]:
    """Every model version announced (live) or registered, once each (live wins), by name and version."""
    found: dict[tuple[str, str], Version] = {}
    for worker in workers:
        for model in worker.get("models") or []:
            if (version := _version(model, live=True)) is not None:
                found[(version.name, version.version)] = version
    for model in register:
        version = _version(model, live=False)
        if version is not None and (version.name, version.version) not in found:
            found[(version.name, version.version)] = version
    return sorted(found.values(), key=lambda v: (v.name, version_key(v.version)))


def served_by(served: list[Version], model: str | None, version: str | None) -> Served:
    """The model a name and optional version mean among the versions known (``served_versions``): 404 for names and
    versions nobody serves."""
    names = sorted({v.name for v in served})
    if model is None or model == ALIAS:
        defaults = {v.name for v in served if v.default and v.live} or {v.name for v in served if v.default}
        candidates = sorted(defaults) or names
        if not candidates:
            return Served(ALIAS, ())
        if len(candidates) > 1:
            raise ModelNotFound(f"no default model is served; name one of {', '.join(names)}")
        name = candidates[0]
    elif model in names:
        name = model
    else:
        raise ModelNotFound(f"unknown model {model!r}; this server serves {', '.join([ALIAS, *names])}")
    mine = [v for v in served if v.name == name]
    versions = tuple(dict.fromkeys(v.version for v in mine))
    chosen = mine if version is None else [v for v in mine if v.matches(version)]
    if not chosen:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; versions served: {', '.join(versions)}")
    live = [v for v in chosen if v.live]
    return Served(name, versions, (live or chosen)[-1])


class ModelDirectory:
    """The announcements and the register of one gateway's Redis, re-read per metadata call and at most every
    WORKERS_TTL_S for inference (a fresh SCAN per infer request would cost Redis more than the request).

    ``readable``: the register entries of the models this process can read from its own disk (the settings'
    default model and repository), registered on first use, so jobs are routed before any worker has started."""

    def __init__(
        self, client: aioredis.Redis, prefix: str, readable: Callable[[], list[dict[str, Any]]] | None = None
    ) -> None:
        self.client = client
        self.prefix = prefix
        self._readable = readable
        self._registering = asyncio.Lock()
        self._read: tuple[float, list[Version]] | None = None

    @classmethod
    def for_settings(cls, client: aioredis.Redis, settings: Settings) -> ModelDirectory:
        def readable() -> list[dict[str, Any]]:
            return repository.readable(settings.model, settings.model_repository, settings.engine.kind)

        return cls(client, settings.queue.prefix, readable)

    async def versions(self, fresh: bool = True) -> list[Version]:
        await self._register_readable()
        now = time.monotonic()
        if fresh or self._read is None or now - self._read[0] >= WORKERS_TTL_S:
            try:
                workers = await presence.ready_workers(self.client, self.prefix)
                register = await presence.registered(self.client, self.prefix)
            except (RedisError, OSError) as exc:
                raise Unavailable("redis is not answering") from exc
            self._read = (now, served_versions(workers, register))
        return self._read[1]

    async def _register_readable(self) -> None:
        """Once, before the first read: callers that come while it runs wait for it (the stats loop and the first
        request start together, and a read before the register is written would route nothing for WORKERS_TTL_S)."""
        if self._readable is None:
            return
        async with self._registering:
            if self._readable is None:
                return
            try:
                await self.register(await asyncio.to_thread(self._readable))
                self._readable = None
            except (Unavailable, OSError) as err:
                log.warning("could not register the models on disk (%s); routing by announcements", err)

    async def register(self, models: list[dict[str, Any]]) -> None:
        """Make models known for routing before any worker announces them (a gateway that can read them)."""
        try:
            await presence.register(self.client, self.prefix, models)
        except (RedisError, OSError) as exc:
            raise Unavailable("redis is not answering") from exc
        self._read = None

    async def resolve(self, model: str | None, version: str | None, fresh: bool = True) -> Served:
        return served_by(await self.versions(fresh), model, version)

    async def ready_model(self, model: str | None, version: str | None, fresh: bool = True) -> Served:
        """The model, while a warm worker serves it; Unavailable (not ready) until one does."""
        served = await self.resolve(model, version, fresh)
        if served.target is None or not served.target.live:
            raise Unavailable(f"model {model or ALIAS!r} is not ready: no worker has warmed it up yet")
        return served

    async def route(self, model: str | None, version: str | None) -> Version:
        """Where a job for ``model`` (and ``version``) goes, from a read at most WORKERS_TTL_S old: a live version,
        or one only the register knows (the job waits in its stream for a worker, as with a pool scaled to zero).
        Unavailable while the model is known nowhere yet."""
        served = await self.resolve(model, version, fresh=False)
        if served.target is None:
            raise Unavailable(f"model {model or ALIAS!r} is not ready: no worker has announced it yet")
        return served.target


async def ready_workers(
    queue: JobQueue, client: aioredis.Redis, prefix: str, timeout_s: float | None = None
) -> list[dict[str, Any]]:
    """The warm workers behind this gateway; Unavailable when Redis does not answer or none has announced itself
    (a gateway without workers would accept jobs that nobody runs). ``timeout_s`` bounds the whole check."""
    if not await queue.ping(2.0 if timeout_s is None else timeout_s):
        raise Unavailable("redis is not answering")
    try:
        async with asyncio.timeout(timeout_s):
            workers = await presence.ready_workers(client, prefix)
    except (RedisError, OSError) as exc:  # TimeoutError is an OSError
        raise Unavailable("redis is not answering") from exc
    if not workers:
        raise Unavailable("no worker has warmed up a model yet")
    return workers


async def is_ready(queue: JobQueue, client: aioredis.Redis, prefix: str, timeout_s: float = 2.0) -> bool:
    """``ready_workers`` as a bool, for health services that poll (a bad announcement reads not ready)."""
    try:
        return bool(await ready_workers(queue, client, prefix, timeout_s))
    except (Unavailable, ValueError):
        return False
