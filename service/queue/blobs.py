"""Packed values in Redis (service.queue.payload): uploads written in chunks, kept outputs read back member by member.

Why apart from the job's state: these are the large values (a 150 MB volume, a 300-slice set of previews), and
what matters for them is memory and round trips, not atomicity. Writing them in chunks and reading them by ranges
keeps a second copy out of the gateway's and the worker's memory; the scripts that change a job's state only ever
delete them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.config import QueueSettings
from service.errors import InvalidRequest, JobNotFound, OutputNotAvailable, PayloadTooLarge, ServiceError
from service.inputs.spool import Data
from service.queue import payload as payload_codec
from service.queue.connection import redis_errors
from service.queue.keys import QueueKeys, check_id


class Blobs:
    def __init__(self, client: aioredis.Redis, settings: QueueSettings, keys: QueueKeys) -> None:
        self._client = client
        self._settings = settings
        self._keys = keys

    async def store_packed(self, key: str, files: Sequence[tuple[str, Data]], ttl: int) -> None:
        """Write the packed upload in chunks: reserve the header, append the members, write the header.

        A 150 MB volume is never built a second time in memory, and the socket's send buffer never
        holds more than one chunk. Compression runs in a thread so the event loop keeps serving.
        """
        try:
            packer = payload_codec.StreamPacker(files)
        except ValueError as exc:  # a file name too long for the container
            raise InvalidRequest(str(exc)) from exc
        chunks = packer.chunks()
        pending: list[bytes] = []
        pending_bytes = 0
        await self._client.set(key, bytes(packer.header_size), ex=ttl)
        try:
            while True:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is not None:
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                if pending and (chunk is None or pending_bytes >= payload_codec.CHUNK_BYTES):
                    await self._client.append(key, b"".join(pending) if len(pending) > 1 else pending[0])
                    pending, pending_bytes = [], 0
                if chunk is None:
                    break
            await self._client.setrange(key, 0, packer.header())
        except BaseException:
            with contextlib.suppress(RedisError, OSError):
                await self._client.delete(key)
            raise

    @redis_errors
    async def payload(self, job_id: str, max_bytes: int) -> list[tuple[str, bytes]]:
        """The job's files; JobNotFound if the upload expired or was deleted, PayloadTooLarge over ``max_bytes``."""
        blob = await self._client.get(self._keys.payload_key(job_id))
        if blob is None:
            raise JobNotFound("the job's upload is gone (expired or deleted)")
        try:
            return await asyncio.to_thread(payload_codec.unpack, blob, max_bytes)
        except payload_codec.PayloadOverLimit as exc:
            raise PayloadTooLarge(str(exc)) from exc
        except ValueError as exc:
            raise ServiceError(f"the stored upload cannot be read: {exc}") from exc

    @redis_errors
    async def store_outputs(self, job_id: str, members: Sequence[tuple[str, bytes]]) -> None:
        """Keep what the derived formats need (service.outputs.formats) for as long as the result; before
        ``complete``, so a caller who sees the job succeed finds them."""
        check_id(job_id)
        await self.store_packed(self._keys.outputs_key(job_id), members, self._settings.result_ttl_s)

    @redis_errors
    async def drop_outputs(self, job_id: str) -> None:
        """For a job deleted while it ran: what it kept must not outlive it (patient data). Not for a duplicate
        delivery that lost the race: the winner wrote the same key."""
        check_id(job_id)
        await self._client.delete(self._keys.outputs_key(job_id))

    @redis_errors
    async def outputs(self, job_id: str, wanted: Callable[[str], bool], max_bytes: int) -> dict[str, bytes]:
        """The members of the job's kept outputs whose names ``wanted`` accepts, each read by its own range.

        A viewer scrolling a 300-slice volume asks for one slice's preview at a time: only that member's bytes
        leave Redis and get inflated, never the whole value. Empty when nothing was kept (expired, or the
        worker kept none); a value that fails to parse is reported, not trusted.
        """
        check_id(job_id)
        key = self._keys.outputs_key(job_id)
        size = int(await self._client.strlen(key))
        if size == 0:
            return {}
        head_len = min(size, 64 * 1024)
        while True:
            head = await self._client.getrange(key, 0, head_len - 1)
            try:
                entries = payload_codec.read_index(head, size, max_bytes)
                break
            except payload_codec.HeaderIncomplete as more:
                if head_len >= size:
                    raise OutputNotAvailable("the kept outputs are truncated") from None
                head_len = min(size, more.needed)
            except ValueError as exc:
                raise OutputNotAvailable(f"the kept outputs cannot be read: {exc}") from exc
        chosen = [entry for entry in entries if wanted(entry.name)]
        async with self._client.pipeline(transaction=False) as pipe:
            for entry in chosen:
                pipe.getrange(key, entry.offset, entry.offset + entry.stored_len - 1)
            stored = await pipe.execute() if chosen else []
        try:
            return {e.name: payload_codec.extract(e, s) for e, s in zip(chosen, stored, strict=True)}
        except ValueError as exc:  # changed under us (deleted and rewritten) or corrupted
            raise OutputNotAvailable(f"the kept outputs cannot be read: {exc}") from exc
