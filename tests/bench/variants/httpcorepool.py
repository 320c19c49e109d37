"""Variant: the upstream client as it was before proxy/transport.py (httpx over httpcore's pool).

Measures what `FastTransport` is worth: `make_client` builds a plain `httpx.AsyncClient` with
httpcore's connection pool (the limits it had), cookies jar included. The routes are unchanged.
"""

from __future__ import annotations

import _base
import httpx


def make_client(settings, transport=None):  # type: ignore[no-untyped-def]
    timeout = httpx.Timeout(
        connect=settings.upstream_connect_timeout,
        read=settings.upstream_timeout,
        write=settings.upstream_timeout,
        pool=settings.upstream_connect_timeout,
    )
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=256, keepalive_expiry=60)
    return httpx.AsyncClient(
        timeout=timeout, limits=limits, follow_redirects=False, trust_env=False,
        transport=transport,
    )


def apply() -> None:
    from proxy import app, upstream

    upstream.make_client = make_client
    app.make_client = make_client


if __name__ == "__main__":
    apply()
    _base.serve()
