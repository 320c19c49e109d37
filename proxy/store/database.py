"""Statements about the database itself rather than a table: a ping, advisory locks, a notify.

Advisory locks here are session-level: they outlive a transaction and are held until unlocked or
until the connection closes.
"""

from __future__ import annotations

import asyncpg


async def ping(conn: asyncpg.Connection) -> None:
    """One round trip that needs nothing but a working server (`/ready`)."""
    await conn.fetchval("SELECT 1")


async def lock(conn: asyncpg.Connection, key: int) -> None:
    """Take the advisory lock `key`, waiting for whoever holds it."""
    await conn.execute("SELECT pg_advisory_lock($1)", key)


async def try_lock(conn: asyncpg.Connection, key: int) -> bool:
    """Take the advisory lock `key` if nobody holds it; False (at once) when somebody does."""
    taken: bool = await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
    return taken


async def unlock(conn: asyncpg.Connection, key: int) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1)", key)


async def notify(
    conn: asyncpg.Connection,
    channel: str,
    payload: str,
    timeout: float | None = None,  # noqa: ASYNC109 (asyncpg's own statement timeout)
) -> None:
    """`pg_notify`: delivered to the channel's listeners when this statement commits."""
    await conn.execute("SELECT pg_notify($1, $2)", channel, payload, timeout=timeout)
