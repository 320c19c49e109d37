"""Applies `sql/NNN_name.sql` in order, each in its own transaction, under an advisory lock.

Applied files are recorded by name in `schema_migrations`; a file that fails rolls back alone
and stops the run, so a later start retries it. Concurrent runners wait on the lock, then find
nothing left to do.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from proxy.store import database
from proxy.store import migrations as migrations_table

MIGRATION_LOCK = 0x63_68_61_74  # "chat": the advisory lock key shared by every runner
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """A migration file failed; the message names it."""


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str


def sql_dir() -> Path:
    """`sql/` beside the package (a checkout), in the working directory, or installed with it.

    `pip install .` puts the files under `<prefix>/share/chatproxy/sql` (pyproject data-files).
    """
    candidates = (
        Path(__file__).resolve().parent.parent / "sql",
        Path.cwd() / "sql",
        Path(sys.prefix) / "share" / "chatproxy" / "sql",
    )
    return next((c for c in candidates if c.is_dir()), candidates[0])


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    if not directory.is_dir():
        # Without it the server would start on an empty schema and fail on every request.
        raise MigrationError(f"no migrations directory at {directory}")
    files = sorted(p for p in directory.glob("*.sql") if _NAME.match(p.name))
    return [Migration(p.stem, p.read_text(encoding="utf-8")) for p in files]


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; return the names applied by this call."""
    migrations = discover(directory)
    applied: list[str] = []
    await database.lock(conn, MIGRATION_LOCK)
    try:
        await migrations_table.ensure_table(conn)
        done = await migrations_table.applied(conn)
        for migration in migrations:
            if migration.name in done:
                continue
            try:
                await migrations_table.apply(conn, migration.name, migration.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{migration.name}.sql failed: {exc}") from exc
            applied.append(migration.name)
    finally:
        await database.unlock(conn, MIGRATION_LOCK)
    return applied
