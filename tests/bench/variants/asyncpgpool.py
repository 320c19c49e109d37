"""Variant: the shipped server on asyncpg's own pool instead of proxy/pool.py.

For measurement only: every acquire runs under asyncpg's `wait_for` and every release in its
shielded task, as before proxy/pool.py, with the same settings (reset skipped, one connection
kept open, idle ones closed after five minutes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import _base
import asyncpg


async def _no_reset(conn: asyncpg.Connection) -> None:
    pass


class Wrapped:
    """asyncpg's pool behind the interface the app uses (only the lifespan calls it directly)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.pending: set[asyncio.Future[Any]] = set()

    async def acquire(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        return await self.pool.acquire(timeout=timeout)

    def release(self, conn: Any, *, discard: bool = False) -> None:
        self._later(self.pool.release(conn))

    def expire_connections(self) -> None:
        self._later(self.pool.expire_connections())

    def _later(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def close(self) -> None:
        await self.pool.close()

    def __getattr__(self, name: str) -> Any:  # get_size, get_idle_size, get_max_size
        return getattr(self.pool, name)


def patch() -> None:
    from proxy import db

    async def create_pool(url: str, settings: Any) -> Wrapped:
        pool = await asyncpg.create_pool(
            url, min_size=1, max_size=settings.db_pool_size, timeout=db.CONNECT_TIMEOUT,
            command_timeout=60, max_inactive_connection_lifetime=db.IDLE_LIFETIME,
            init=db._init_connection, reset=_no_reset,
        )
        return Wrapped(pool)

    @asynccontextmanager
    async def connection(pool: Wrapped, timeout: float) -> AsyncIterator[Any]:  # noqa: ASYNC109
        try:
            conn = await pool.pool.acquire(timeout=timeout)
        except (*db.UNAVAILABLE, asyncpg.PostgresError):
            raise db.DatabaseUnavailable() from None
        try:
            yield conn
        except db.UNAVAILABLE:
            await pool.pool.expire_connections()
            raise db.DatabaseUnavailable() from None
        finally:
            try:
                await pool.pool.release(conn)
            except db.UNAVAILABLE:
                pass

    db.create_pool = create_pool  # type: ignore[assignment]
    db.connection = connection  # type: ignore[assignment]


if __name__ == "__main__":
    patch()
    _base.serve()
