"""Applies `sql/NNN_name.sql` in order, each in its own transaction, under an advisory lock.

Applied files are recorded by name in `schema_migrations`; a file that fails rolls back alone
and stops the run, so a later start retries it. Concurrent runners wait on the lock, then find
nothing left to do. The lock is session-level, since it spans the files' transactions (a
transaction-level one would let runners take turns file by file): a caller that lends
connections out closes the one this ran on rather than lending it again (the server's
lifespan does).

A file with the line `-- chatproxy: no transaction` runs one statement at a time outside a
transaction (statements end with `;` at the end of a line), for `CREATE INDEX CONCURRENTLY`; it
must be written so that every statement can run again, and is recorded once all of it has run.
Runners wait for the lock by polling `pg_try_advisory_lock` rather than blocking in
`pg_advisory_lock`: a runner blocked in a statement holds a snapshot, which a concurrent index
build would wait for while the runner waits for the builder's lock (a deadlock).
"""

from __future__ import annotations

import asyncio
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from proxy.store import database
from proxy.store import migrations as migrations_table

MIGRATION_LOCK = 0x63_68_61_74  # "chat": the advisory lock key shared by every runner
_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_NO_TRANSACTION = re.compile(r"^-- chatproxy: no transaction$", re.MULTILINE)
_STATEMENT_END = re.compile(r";[ \t]*$", re.MULTILINE)
LOCK_POLL = 0.05  # seconds between tries for the migration lock


class MigrationError(RuntimeError):
    """A migration file failed; the message names it."""


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def transactional(self) -> bool:
        return _NO_TRANSACTION.search(self.sql) is None

    def statements(self) -> list[str]:
        """The file's statements, for a file run outside a transaction (comments kept)."""
        parts = (part.strip() for part in _STATEMENT_END.split(self.sql))
        return [p for p in parts if any(
            line.strip() and not line.strip().startswith("--") for line in p.splitlines())]


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


async def _lock(conn: asyncpg.Connection) -> None:
    """Take the migration lock, polling (see the module's docstring for why not blocking)."""
    # The lock is held by another session: nothing in this process could signal its release.
    while not await database.try_lock(conn, MIGRATION_LOCK):  # noqa: ASYNC110
        await asyncio.sleep(LOCK_POLL)


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; return the names applied by this call."""
    migrations = discover(directory)
    applied: list[str] = []
    await _lock(conn)
    try:
        await migrations_table.ensure_table(conn)
        done = await migrations_table.applied(conn)
        for migration in migrations:
            if migration.name in done:
                continue
            try:
                if migration.transactional:
                    await migrations_table.apply(conn, migration.name, migration.sql)
                else:
                    for statement in migration.statements():
                        await conn.execute(statement)
                    await migrations_table.record(conn, migration.name)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{migration.name}.sql failed: {exc}") from exc
            applied.append(migration.name)
    finally:
        await database.unlock(conn, MIGRATION_LOCK)
    return applied


async def pending(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """The migrations `migrate` would apply now, without applying them (nor taking the lock)."""
    names = [m.name for m in discover(directory)]
    done = await migrations_table.applied(conn)
    return [name for name in names if name not in done]
