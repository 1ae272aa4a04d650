"""The REST side of service/access.py: a dependency naming the caller of every route but health and the viewer's
static files, so a route cannot forget to check (a test walks the route table)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.auth import Principal

WWW_AUTHENTICATE = 'Bearer realm="c2p-serve"'
# Route prefixes -> the API name the metrics and the audit log use.
APIS = (("/v2", "kserve-rest"), ("/dicomweb", "stow-rs"))


def api_of(request: Request) -> str:
    path = request.url.path
    return next((name for prefix, name in APIS if path.startswith(prefix)), "rest")


async def caller(request: Request) -> Principal:
    principal = await request.app.state.access.caller(request.headers, api_of(request))
    request.state.principal = principal
    return principal


Caller = Annotated[Principal, Depends(caller)]
