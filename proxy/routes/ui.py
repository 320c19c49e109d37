"""The session browser (contract §12): `GET /ui` and its three static files, from `proxy/ui/`.

Everything the page needs comes from this origin, so it works offline. Every answer carries a
Content-Security-Policy that allows scripts, styles, images and requests from this origin only
(no inline script or style, no framing, no plugins, no form posts elsewhere), and headers that
keep the page out of frames and its key out of referrers. The page itself holds nothing
secret: it asks for a key and keeps it in the tab's sessionStorage.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from litestar import Response, get

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
FILES = {
    "index.html": "text/html",  # Litestar adds "; charset=utf-8" to text types
    "app.css": "text/css",
    "app.js": "text/javascript",
    "icon.svg": "image/svg+xml",
}


@cache
def _read(name: str) -> bytes:
    """A file of proxy/ui, read on first use (never at import) and kept."""
    return resources.files("proxy.ui").joinpath(name).read_bytes()


def _file(name: str) -> Response[bytes]:
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)


@get("/ui", tags=["session browser"], summary="The session browser",
     description="One HTML page (with `/ui/app.js`, `/ui/app.css`, `/ui/icon.svg`, all from "
     "this origin): sign in with a key, list, search and read sessions, rename, delete and "
     "restore, clear, export, fork, and continue a conversation. Served with a "
     "Content-Security-Policy that allows only this origin.",
     media_type="text/html", sync_to_thread=False)
def page() -> Response[bytes]:
    return _file("index.html")


@get("/ui/app.js", include_in_schema=False, sync_to_thread=False)
def script() -> Response[bytes]:
    return _file("app.js")


@get("/ui/app.css", include_in_schema=False, sync_to_thread=False)
def style() -> Response[bytes]:
    return _file("app.css")


@get("/ui/icon.svg", include_in_schema=False, sync_to_thread=False)
def icon() -> Response[bytes]:
    return _file("icon.svg")


handlers = [page, script, style, icon]
