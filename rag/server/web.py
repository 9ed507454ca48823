"""The document Q&A page: `/` serves static/index.html, `/static/NAME` the files beside it.

Plain files, no build step and nothing from a CDN, so the page works offline. Only files that
are in static/ are served, by exact name (no paths). The page is public (auth.PUBLIC_PATHS); it
asks for an API key when the API wants one. Ignores: everything the page does (static/app.js).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from rag.server.errors import APIError

router = APIRouter()

STATIC_DIR = Path(__file__).parent / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page loads only its own files and talks only to this server.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new version of the page shows at once
}


@cache
def static_files() -> dict[str, Path]:
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in _MEDIA_TYPES}


def _file(name: str) -> FileResponse:
    path = static_files().get(name)
    if path is None:
        raise APIError(404, f"no static file {name!r}", code="not_found")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_HEADERS)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return _file("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    return _file(name)
