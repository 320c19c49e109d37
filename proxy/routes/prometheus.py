"""`GET /metrics`: the Prometheus text exposition, without authentication.

Nothing in it identifies a caller: labels are route templates, methods, status codes and
upstream names (see proxy/metrics.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, Response, get

from proxy import metrics
from proxy.runtime import runtime


@get(
    "/metrics",
    summary="Prometheus metrics",
    description="The Prometheus text format; no authentication. See the README's Operations "
    "section for the list of metrics.",
    media_type=metrics.MEDIA_TYPE,
    tags=["operations"],
)
async def scrape(request: Request[Any, Any, Any]) -> Response[bytes]:
    metrics.observe_pool(runtime(request).pool)
    # A multiprocess scrape reads every worker's file: off the event loop.
    body = await asyncio.to_thread(metrics.render)
    return Response(body, media_type=metrics.MEDIA_TYPE)


handlers = [scrape]
