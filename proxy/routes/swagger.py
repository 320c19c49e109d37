"""The `/schema` page: Swagger UI with its assets served by chatproxy itself, so it works offline.

Litestar's Swagger plugin loads Swagger UI (and a favicon) from a CDN by default; here every
asset comes from the `swagger-ui-bundle-v2` package under `/schema/assets/`, and only the few
files the page uses are served (not the bundle's demo page, which points at a remote spec).
"""

from __future__ import annotations

from pathlib import Path

from litestar import get
from litestar.exceptions import NotFoundException
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.response import File

ASSETS = "/schema/assets"
_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui-standalone-preset.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}


def _bundle() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


def render_plugin() -> SwaggerRenderPlugin:
    """The page at `/schema`, pointed at our own copies of Swagger UI's files."""
    return SwaggerRenderPlugin(
        path="/",
        js_url=f"{ASSETS}/swagger-ui-bundle.js",
        css_url=f"{ASSETS}/swagger-ui.css",
        standalone_preset_js_url=f"{ASSETS}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{ASSETS}/favicon-32x32.png'>",
    )


@get(f"{ASSETS}/{{name:str}}", include_in_schema=False, sync_to_thread=False)
def asset(name: str) -> File:
    media_type = _FILES.get(name)
    if media_type is None:
        raise NotFoundException()
    return File(
        _bundle() / name,
        media_type=media_type,
        content_disposition_type="inline",
        # The bundle changes only with the package's version; an hour spares reloads.
        headers={"Cache-Control": "public, max-age=3600"},
    )


handlers = [asset]
