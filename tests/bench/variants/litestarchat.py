"""Variant: the chat route dispatched by Litestar, as before proxy/routes/direct.py.

For measurement only: it shows what answering `POST /v1/chat/completions` ahead of Litestar's
router saves, side by side with the shipped server.
"""

from __future__ import annotations

import _base

if __name__ == "__main__":
    from proxy.routes import direct

    direct.chat_first = lambda app, rest: rest  # type: ignore[assignment]
    _base.serve()
