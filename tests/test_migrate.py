"""The migration runner: from empty, re-applied, concurrent runners, and a failing file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from proxy.migrate import MIGRATION_LOCK, MigrationError, discover, migrate, sql_dir
from tests.conftest import fresh_database


@pytest.fixture
async def empty_database(server_url: str) -> AsyncIterator[str]:
    """A brand-new database with nothing in it, dropped afterwards."""
    async with fresh_database(server_url, "chatproxy_mig_", migrated=False) as url:
        yield url


async def applied_names(conn: asyncpg.Connection) -> list[str]:
    rows = await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")
    return [r["name"] for r in rows]


async def tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    )
    return {r["tablename"] for r in rows}


def test_discover_finds_the_shipped_files_in_order() -> None:
    names = [m.name for m in discover()]
    assert names[0] == "001_init"
    assert names == sorted(names)
    assert names == sorted(p.stem for p in sql_dir().glob("[0-9][0-9][0-9]_*.sql"))


def test_discover_ignores_files_that_are_not_migrations(tmp_path: Path) -> None:
    for name in ("002_b.sql", "001_a.sql", "notes.sql", "1_short.sql", "003_Upper.sql",
                 "004_c.sql.bak", "005_d.txt"):
        (tmp_path / name).write_text("SELECT 1;")
    assert [m.name for m in discover(tmp_path)] == ["001_a", "002_b"]


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MigrationError) as caught:
        discover(tmp_path / "sql")
    assert str(caught.value) == f"no migrations directory at {tmp_path / 'sql'}"


async def test_from_empty_then_reapplied_is_a_no_op(empty_database: str) -> None:
    everything = [m.name for m in discover()]
    conn = await asyncpg.connect(empty_database)
    try:
        assert await migrate(conn) == everything
        assert await applied_names(conn) == everything
        assert {"users", "api_keys", "chat_sessions", "chat_messages",
                "schema_migrations"} <= await tables(conn)
        before = await conn.fetch("SELECT name, applied_at FROM schema_migrations ORDER BY name")
        assert await migrate(conn) == []
        after = await conn.fetch("SELECT name, applied_at FROM schema_migrations ORDER BY name")
        assert after == before
        # The lock is released: another session can take it at once.
        other = await asyncpg.connect(empty_database)
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK)
        finally:
            await other.close()
    finally:
        await conn.close()


async def test_concurrent_runners_apply_each_file_once(empty_database: str) -> None:
    everything = [m.name for m in discover()]
    conns = [await asyncpg.connect(empty_database) for _ in range(5)]
    try:
        results = await asyncio.gather(*(migrate(conn) for conn in conns))
        # Exactly one runner applied everything; the others waited and found nothing to do.
        assert sorted(results, key=len) == [[], [], [], [], everything]
        rows = await conns[0].fetch("SELECT name, count(*) AS n FROM schema_migrations GROUP BY 1")
        assert sorted((r["name"], r["n"]) for r in rows) == [(name, 1) for name in everything]
    finally:
        for conn in conns:
            await conn.close()


async def test_a_failing_file_rolls_back_alone_and_stops_the_run(
    empty_database: str, tmp_path: Path
) -> None:
    (tmp_path / "001_first.sql").write_text("CREATE TABLE first_table (id int);")
    (tmp_path / "002_broken.sql").write_text(
        "-- creates a table, then fails: the table must not survive\n"
        "CREATE TABLE broken_table (id int);\n"
        "INSERT INTO no_such_table VALUES (1);\n"
    )
    (tmp_path / "003_after.sql").write_text("CREATE TABLE after_table (id int);")
    conn = await asyncpg.connect(empty_database)
    try:
        with pytest.raises(MigrationError) as caught:
            await migrate(conn, tmp_path)
        assert str(caught.value).startswith("002_broken.sql failed: ")
        assert await applied_names(conn) == ["001_first"]
        assert await tables(conn) == {"schema_migrations", "first_table"}
        # The lock was released even though the run failed.
        other = await asyncpg.connect(empty_database)
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK)
            await other.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        finally:
            await other.close()

        # Once the file is fixed, the next run applies it and the rest.
        (tmp_path / "002_broken.sql").write_text("CREATE TABLE broken_table (id int);")
        assert await migrate(conn, tmp_path) == ["002_broken", "003_after"]
        assert await applied_names(conn) == ["001_first", "002_broken", "003_after"]
    finally:
        await conn.close()


async def test_a_failing_file_leaves_the_connection_usable(
    empty_database: str, tmp_path: Path
) -> None:
    (tmp_path / "001_syntax.sql").write_text("CREATE TABLE oops (;")
    conn = await asyncpg.connect(empty_database)
    try:
        with pytest.raises(MigrationError, match=r"^001_syntax\.sql failed: "):
            await migrate(conn, tmp_path)
        assert await conn.fetchval("SELECT 1") == 1
        assert not conn.is_in_transaction()
    finally:
        await conn.close()
