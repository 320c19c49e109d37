"""`/health` (the process runs) and `/ready` (the database answers)."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, Response, get

from proxy import db
from proxy.app import runtime
from proxy.errors import DatabaseUnavailable, error_bytes


@get("/health", include_in_schema=True, sync_to_thread=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready")
async def ready(request: Request[Any, Any, Any]) -> Response[Any]:
    rt = runtime(request)
    try:
        async with db.connection(rt.pool, rt.settings.db_acquire_timeout) as conn:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=2)
    except (DatabaseUnavailable, TimeoutError):
        error = DatabaseUnavailable()
        return Response(error_bytes(error), status_code=503, media_type="application/json")
    return Response({"status": "ready"}, status_code=200)


handlers = [health, ready]
