"""HTTP routes, one module per area; each exposes `handlers` for create_app().

`paths` is the session routes' two prefixes (proxy/routes/sessions.py, session_lifecycle.py).

A route module never imports another one: what two of them share lives below the routes
(proxy/access.py, proxy/reading.py, ...), or here when it is about the routes themselves.
"""

from __future__ import annotations

PREFIXES = ["/v1/chat/sessions", "/chat/sessions"]


def paths(suffix: str = "") -> list[str]:
    """A session route's path under both prefixes."""
    return [prefix + suffix for prefix in PREFIXES]
