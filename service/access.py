"""Authentication and the audit log together: every API asks who is calling and reports what they did here.

REST, STOW-RS, the Open Inference Protocol and c2p.v1 gRPC all go through :meth:`Access.caller`, so a refusal looks
the same everywhere (401 / UNAUTHENTICATED, one message) and lands in the same audit log with its real reason.
"""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as aioredis

from service.auth import Authenticator, Principal
from service.config import Settings
from service.errors import Unauthenticated
from service.ops.audit import Action, AuditLog


def refusal_reason(err: Unauthenticated) -> str:
    """What the caller is not told: the token library's error class, or the kind of credential that failed."""
    cause = err.__cause__
    if cause is not None:
        return type(cause).__name__
    return "claim" if "claim" in err.message else "credential"


class Access:
    def __init__(self, settings: Settings, client: aioredis.Redis | None, authenticator: Authenticator | None = None):
        self.auth = authenticator or Authenticator(settings)
        self.audit = AuditLog(client, settings)

    async def caller(self, headers: Mapping[str, str], api: str) -> Principal:
        try:
            return await self.auth.authenticate(headers)
        except Unauthenticated as err:
            await self.audit.record("denied", None, api, reason=refusal_reason(err))
            raise

    async def record(
        self, action: Action, principal: Principal, api: str, job_id: str | None = None, **detail: str | int
    ) -> None:
        await self.audit.record(action, principal, api, job_id, **detail)
