"""The REST side of service/access.py: a dependency naming the caller of every route but health and the viewer's
static files, so a route cannot forget to check (a test walks the route table)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.auth import Principal
from service.errors import RetryLater, ServiceError, Unauthenticated

WWW_AUTHENTICATE = 'Bearer realm="c2p-serve"'
# Route prefixes -> the API name the metrics and the audit log use.
APIS = (("/v2", "kserve-rest"), ("/dicomweb", "stow-rs"))


def api_for(path: str) -> str:
    return next((name for prefix, name in APIS if path.startswith(prefix)), "rest")


def api_of(request: Request) -> str:
    return api_for(request.url.path)


def error_headers(err: ServiceError) -> dict[str, str]:
    """What every HTTP error answer carries whatever its body's shape (/v1's or the v2 protocol's): when to retry,
    and how to authenticate."""
    headers = {}
    if isinstance(err, RetryLater):
        headers["Retry-After"] = str(err.retry_after_s)
    if isinstance(err, Unauthenticated):
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE
    return headers


async def caller(request: Request) -> Principal:
    principal = await request.app.state.access.caller(request.headers, api_of(request))
    request.state.principal = principal
    return principal


Caller = Annotated[Principal, Depends(caller)]
