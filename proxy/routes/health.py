"""`/health` (the process runs) and `/ready` (the database answers, within a deadline)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from litestar import Request, Response, get

from proxy import db
from proxy.errors import DatabaseUnavailable, error_bytes
from proxy.runtime import runtime
from proxy.store import database

# However the database fails (refusing, gone, or hanging), /ready answers within this.
READY_DEADLINE = 2.0


@get("/health", include_in_schema=True, sync_to_thread=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready")
async def ready(request: Request[Any, Any, Any]) -> Response[Any]:
    rt = runtime(request)
    try:
        async with asyncio.timeout(READY_DEADLINE):
            timeout = min(rt.settings.db_acquire_timeout, READY_DEADLINE)
            async with db.connection(rt.pool, timeout) as conn:
                await database.ping(conn)
    except (DatabaseUnavailable, TimeoutError, OSError, asyncpg.PostgresError,
            asyncpg.InterfaceError):
        error = DatabaseUnavailable()
        return Response(error_bytes(error), status_code=503, media_type="application/json")
    return Response({"status": "ready"}, status_code=200)


handlers = [health, ready]
