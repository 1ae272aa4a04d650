"""The viewer page at /ui: plain HTML and JavaScript served by the gateway, no build step.

It uses only the public API (upload, job status, ``result?format=png&slice=N`` overlays, the reliability report),
so it shows exactly what any client would get.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from service.errors import OutputNotAvailable

FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


def _read(name: str) -> bytes:
    return resources.files("service.gateway").joinpath("ui", name).read_bytes()


@router.get("/ui")
async def page_without_slash() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/")
async def page() -> Response:
    return Response(_read("index.html"), media_type=FILES["index.html"], headers={"Cache-Control": "no-cache"})


@router.get("/ui/{name}")
async def asset(name: str) -> Response:
    if name not in FILES:
        raise OutputNotAvailable(f"no such viewer file: {name}")
    return Response(_read(name), media_type=FILES[name], headers={"Cache-Control": "no-cache"})
