"""Variant: the chat route dispatched by Litestar, as before proxy/routes/fastpath.py.

For measurement only: it shows what answering `POST /v1/chat/completions` (and `/v1/responses`)
ahead of Litestar's router saves, side by side with the shipped server.
"""

from __future__ import annotations

import _base

if __name__ == "__main__":
    from proxy.routes import fastpath

    fastpath.chat_first = lambda app, rest, *routes, **more: rest  # type: ignore[assignment]
    _base.serve()
