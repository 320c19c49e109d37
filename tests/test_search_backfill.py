"""Migration 005 on a database that already holds messages: the column is added, the indexes
are built, the backfill fills what was stored before, in batches, once, under its lock."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from proxy import searchindex, searchtext
from proxy.migrate import migrate, sql_dir
from proxy.store import search as searchstore
from proxy.store import sessions, users
from tests.conftest import fresh_database

OLD_MESSAGES = [
    ("user", '{"role":"user","content":"Where is the ELEPHANT\\u0000sanctuary?"}'),
    ("assistant", '{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":'
                  '"function","function":{"name":"lookup","arguments":"{\\"place\\": '
                  '\\"Chiang Mai\\"}"}}]}'),
    ("tool", '{"role":"tool","tool_call_id":"c1","content":"\\ud800 north of the city"}'),
    ("user", '{"role":"user","content":[{"type":"text","text":"thanks, elephants!"}]}'),
]


@pytest.fixture
async def old_database(server_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """A database migrated up to 004 only, as a server before this feature left it."""
    old = tmp_path / "sql"
    old.mkdir()
    for path in sorted(sql_dir().glob("00[1-4]_*.sql")):
        shutil.copy(path, old / path.name)
    async with fresh_database(server_url, "chatproxy_old_", migrated=False) as url:
        conn = await asyncpg.connect(url)
        try:
            assert await migrate(conn, old) == [p.stem for p in sorted(old.glob("*.sql"))]
        finally:
            await conn.close()
        yield url


async def test_migrating_a_database_with_messages_then_backfilling_makes_them_searchable(
    old_database: str,
) -> None:
    conn = await asyncpg.connect(old_database)
    try:
        user = await users.create_user(conn, "old-user")
        assert user is not None
        for n in range(3):  # three sessions with the same four messages
            await conn.execute(
                "INSERT INTO chat_sessions (id, user_id, session_name, max_history_messages) "
                "VALUES ($1, $2, $3, 20)", f"sess_old{n}", user["id"], f"Trip planning {n}")
            await conn.executemany(
                "INSERT INTO chat_messages (session_id, seq, role, body, tokens) "
                "VALUES ($1, $2, $3, $4, 5)",
                [(f"sess_old{n}", seq, role, body)
                 for seq, (role, body) in enumerate(OLD_MESSAGES, 1)])

        applied = await migrate(conn)  # 005_search, and whatever came after it
        assert applied[0] == "005_search"
        columns = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'search' "
            "AND table_name IN ('chat_messages', 'chat_sessions')")
        assert columns == 2
        invalid = await conn.fetchval(
            "SELECT count(*) FROM pg_index WHERE NOT indisvalid")  # every index was built
        assert invalid == 0
        words = ["elephant"]
        found, _ = await searchstore.search_messages(conn, user["id"], words, 10, 0)
        assert found == []  # not indexed yet

        # Another process holds the backfill's lock: this one leaves the work to it.
        other = await asyncpg.connect(old_database)
        try:
            await other.execute("SELECT pg_advisory_lock($1)", searchindex.BACKFILL_LOCK)
            assert await searchindex.backfill(conn, batch=5) is None
        finally:
            await other.close()
        assert await searchindex.backfill(conn, batch=5) == 12 + 3
        assert await searchindex.backfill(conn, batch=5) == 0  # idempotent: nothing left
        assert await conn.fetchval(
            "SELECT count(*) FROM chat_messages WHERE search IS NULL") == 0

        found, _ = await searchstore.search_messages(conn, user["id"], words, 10, 0)
        assert sorted((f["session_id"], f["seq"]) for f in found) == sorted(
            (f"sess_old{n}", seq) for n in range(3) for seq in (1, 4))
        snippets = {f["snippet"] for f in found}
        assert snippets == {"Where is the ELEPHANT\x00sanctuary?", "thanks, elephants!"}
        for q, seq in (("chiang mai", 2), ("north city", 3), ("sanctuary", 1)):
            found, _ = await searchstore.search_messages(
                conn, user["id"], searchtext.query_words(q), 10, 0, session_id="sess_old1")
            assert [f["seq"] for f in found] == [seq], q
        await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                                  schema="pg_catalog")  # as the server's pool does
        data, total, _ = await sessions.list_sessions(
            conn, user["id"], 10, 0, False,
            where=sessions.SessionFilter(query=searchtext.tsquery(["trip", "2"])))
        assert ([s["id"] for s in data], total) == (["sess_old2"], 1)
    finally:
        await conn.close()


async def test_rows_written_without_the_column_are_filled_by_a_later_run(
    server_url: str,
) -> None:
    """An older process (a rolling upgrade) stores a message without `search`."""
    async with fresh_database(server_url, "chatproxy_rolling_") as url:
        await _store_late_and_backfill(url)


async def _store_late_and_backfill(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        user = await users.create_user(conn, "rolling-user")
        assert user is not None
        await conn.execute(
            "INSERT INTO chat_sessions (id, user_id, max_history_messages) "
            "VALUES ('sess_late', $1, 5)", user["id"])
        session = {"id": "sess_late"}
        await conn.execute(
            "INSERT INTO chat_messages (session_id, seq, role, body, tokens) "
            "VALUES ($1, 1, 'user', '{\"role\":\"user\",\"content\":\"late armadillo\"}', 3)",
            session["id"])
        assert await searchindex.backfill(conn) == 2  # the message and the session
        found, _ = await searchstore.search_messages(conn, user["id"], ["armadillo"], 10, 0)
        assert [f["snippet"] for f in found] == ["late armadillo"]
    finally:
        await conn.close()
