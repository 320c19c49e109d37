"""`schema_migrations`: which `sql/NNN_name.sql` files were applied, and applying one.

proxy/migrate.py decides what to apply, in order, under an advisory lock.
"""

from __future__ import annotations

import asyncpg


async def ensure_table(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            name        text PRIMARY KEY,
            applied_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )


async def applied(conn: asyncpg.Connection) -> set[str]:
    """The names of the migrations applied so far."""
    return {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}


async def apply(conn: asyncpg.Connection, name: str, sql: str) -> None:
    """Run one migration file and record it, in one transaction: all of it or nothing."""
    async with conn.transaction():
        await conn.execute(sql)
        await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
