"""The assets of the interactive `/schema` page (Swagger UI), served by chatproxy itself so that
the page works offline (contract §12). They come from the `swagger-ui-py` distribution's
static files; `swagger_plugin()` points Litestar's Swagger page at them.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from litestar import Response, get
from litestar.exceptions import NotFoundException
from litestar.openapi.plugins import SwaggerRenderPlugin

ASSETS = "/schema/assets/"
FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "swagger-ui.css": "text/css",
}


def swagger_plugin() -> SwaggerRenderPlugin:
    return SwaggerRenderPlugin(
        path="/",
        js_url=ASSETS + "swagger-ui-bundle.js",
        css_url=ASSETS + "swagger-ui.css",
        standalone_preset_js_url=ASSETS + "swagger-ui-standalone-preset.js",
        favicon="<link rel='icon' type='image/svg+xml' href='/ui/icon.svg'>",
    )


@cache
def _read(name: str) -> bytes:
    """A Swagger UI file, read on first use (never at import) and kept."""
    return resources.files("swagger_ui").joinpath("static", name).read_bytes()


@get(ASSETS + "{name:str}", include_in_schema=False, sync_to_thread=False)
def asset(name: str) -> Response[bytes]:
    if name not in FILES:
        raise NotFoundException()
    return Response(_read(name), media_type=FILES[name],
                    headers={"Cache-Control": "public, max-age=86400"})


handlers = [asset]
