"""One access-log line for every request answered 4xx, whichever part of the gateway answered it.

Refusals are what an operator looks for first (a client sending the wrong thing, a key that stopped working), and
they come from several places: the error handlers, the Open Inference Protocol's v2 errors, STOW-RS, unknown routes.
One middleware sees them all.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.gateway.identity import api_for

access_log = logging.getLogger("c2p.access")

# A 4xx answer's body is read this far for its error code (error bodies are a few hundred bytes).
ERROR_BODY_PEEK = 4096
ERROR_CODE_STATE = "error_code"  # request.state key for answers whose body has no "code" (STOW-RS's 409)


class RejectedLog:
    """ASGI middleware: one INFO line on ``c2p.access`` for every request answered 4xx, whichever path answered it
    (the error handlers below, the Open Inference Protocol's v2 errors, STOW-RS, an unknown route).

    The line holds the API, status, error code, method, route template (``/v1/segmentations/{job_id}``; the raw
    path only where no route matched) and the caller's tenant once known; never the query string, the message or
    anything else of the request, so no patient data reaches it. The code is the ``code`` of the answer's JSON body
    (both error shapes carry one) unless a handler put one in ``request.state.error_code``. 5xx answers are logged
    where they happen, as before."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})  # the dict request.state writes to, so the principal is seen here
        status = 0
        json_body = False
        body = bytearray()

        async def watched(message: Message) -> None:
            nonlocal status, json_body
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers", ()))
                json_body = b"json" in headers.get(b"content-type", b"")
            elif message["type"] == "http.response.body" and 400 <= status < 500 and json_body:
                body.extend(message.get("body", b"")[: ERROR_BODY_PEEK - len(body)])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            if 400 <= status < 500:
                log_rejected(scope, status, bytes(body))


def log_rejected(scope: Scope, status: int, body: bytes) -> None:
    state = scope.get("state") or {}
    code = state.get(ERROR_CODE_STATE) or _body_code(body) or "-"
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None) or scope.get("path", "")
    path = scope.get("path", "")
    entry: dict[str, str | int] = {
        "event": "rejected",
        "api": api_for(path),
        "status": status,
        "code": str(code),
        "method": str(scope.get("method", "")),
        "route": str(template),
    }
    principal = state.get("principal")
    if principal is not None:
        entry["tenant"] = principal.tenant
    access_log.info("%s", json.dumps(entry, separators=(",", ":")))


def _body_code(body: bytes) -> str | None:
    try:
        value = json.loads(body)
    except ValueError:  # not JSON, or cut off at the peek
        return None
    code = value.get("code") if isinstance(value, dict) else None
    return code if isinstance(code, str) else None
