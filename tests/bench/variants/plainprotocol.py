"""Variant: the shipped server on uvicorn's own httptools protocol (no `GuardedProtocol`).

uvicorn's options as before proxy/server.py: `http="httptools"` and its defaults (a keep-alive
timer stopped at a connection's first byte, no head size or head time limit, no cap on
connections). The shutdown (`server.Server`) is unchanged. For measurement only.
"""

from __future__ import annotations

from typing import Any

import _base


def _options(settings: Any) -> dict[str, Any]:
    return {"http": "httptools"}


if __name__ == "__main__":
    from proxy import server

    server.uvicorn_options = _options
    _base.serve()
