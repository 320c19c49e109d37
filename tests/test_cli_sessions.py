"""`chatproxy sessions export/import` and `chatproxy cleanup`, run as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy import codec
from proxy.store import lifecycle, messages, sessions
from proxy.store.messages import NewMessage
from tests.conftest import ROOT, User, fresh_database, make_user
from tests.test_lifecycle import CONVO, bodies


async def cli(url: str, *args: str, stdin: bytes | None = None,
              **env: str) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CHATPROXY_")}
    environ.update(CHATPROXY_CONFIG=os.devnull, CHATPROXY_DATABASE_URL=url,
                   CHATPROXY_LOG_LEVEL="warning",
                   CHATPROXY_MODELS_FILE=str(ROOT / "config" / "models.toml"), **env)
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy", *args], cwd=ROOT, env=environ,
        input=stdin, capture_output=True, timeout=120)


async def with_codec(conn: asyncpg.Connection) -> asyncpg.Connection:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")
    return conn


async def convo(conn: asyncpg.Connection, owner: User, **fields: Any) -> str:
    session = await sessions.create_session(conn, owner.id, {"max_history_messages": 20, **fields})
    turn = [NewMessage(m, tokens, status) for m, tokens, status in CONVO]
    await messages.store_turn(conn, session["id"], turn)
    return str(session["id"])


async def exported(conn: asyncpg.Connection, session_id: str) -> bytes:
    chunks = [c async for c in lifecycle.export_document(conn, session_id, user_id=None)]
    return b"".join(chunks)


# --- sessions export / import -----------------------------------------------------------------


async def test_export_writes_the_document(db, database_url, alice) -> None:
    conn = await with_codec(db)
    session_id = await convo(conn, alice, session_name="cli \u0000\ud800", model="gpt-4o")
    done = await cli(database_url, "sessions", "export", session_id)
    assert done.returncode == 0, done.stderr
    assert done.stdout == await exported(conn, session_id) + b"\n"
    doc = codec.loads(done.stdout)
    assert doc["session"]["session_name"] == "cli \u0000\ud800"
    assert [m["seq"] for m in doc["messages"]] == list(range(1, len(CONVO) + 1))


async def test_export_of_a_soft_deleted_session(db, database_url, alice) -> None:
    conn = await with_codec(db)
    session_id = await convo(conn, alice)
    await sessions.soft_delete_session(conn, alice.id, session_id)
    done = await cli(database_url, "sessions", "export", session_id)
    assert done.returncode == 0, done.stderr
    assert codec.loads(done.stdout)["session"]["is_active"] is False


async def test_export_of_an_unknown_session(database_url) -> None:
    done = await cli(database_url, "sessions", "export", "sess_nope")
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr.decode().endswith("chatproxy: no session 'sess_nope'\n")


async def test_import_creates_the_session_for_the_user(db, database_url, alice, bob,
                                                       tmp_path: Path) -> None:
    conn = await with_codec(db)
    source = await convo(conn, alice, session_name="from alice", system_prompt="sp")
    path = tmp_path / "doc.json"
    path.write_bytes(await exported(conn, source))
    done = await cli(database_url, "sessions", "import", str(path), "--user", bob.name)
    assert done.returncode == 0, done.stderr
    new_id = done.stdout.decode().strip()
    assert re.fullmatch(r"sess_[A-Za-z0-9]{24}", new_id)
    assert done.stderr.decode().endswith(f"imported {len(CONVO)} messages for user {bob.name}\n")
    created = await sessions.get_session(conn, bob.id, new_id)
    original = await sessions.get_session(conn, alice.id, source)
    assert created is not None and original is not None
    same = ("session_name", "system_prompt", "max_history_messages", "message_count",
            "total_tokens", "last_message_at", "metadata")
    assert {k: created[k] for k in same} == {k: original[k] for k in same}
    assert await bodies(db, new_id) == await bodies(db, source)
    # From standard input, by user id.
    done = await cli(database_url, "sessions", "import", "-", "--user", bob.id,
                     stdin=path.read_bytes())
    assert done.returncode == 0, done.stderr
    assert await bodies(db, done.stdout.decode().strip()) == await bodies(db, source)


@pytest.mark.parametrize(("content", "error"), [
    (b'{"format": "chatproxy.session.v1", "session": {}, "messages": [{"content": "x"}]}',
     "invalid export document: Missing required parameter: messages[0].role"),
    (b'{"format": "v0", "session": {}, "messages": []}',
     "invalid export document: Invalid value for format: expected 'chatproxy.session.v1'"),
    (b"{not json", "{path} is not valid JSON"),
    # Python's json module would take these and store them changed (issue 13, item 10).
    (b'{"format": "chatproxy.session.v1", "session": {}, "messages": '
     b'[{"role": "user", "content": "x", "tokens": NaN}]}', "{path} is not valid JSON"),
    (b'{"format": "chatproxy.session.v1", "session": {"max_history_tokens": 1e400}, '
     b'"messages": []}', "{path} is not valid JSON"),
])
async def test_import_of_a_bad_document_creates_nothing(db, database_url, bob, tmp_path: Path,
                                                        content: bytes, error: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    done = await cli(database_url, "sessions", "import", str(path), "--user", bob.name)
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr.decode().endswith(f"chatproxy: {error.format(path=path)}\n")
    assert await db.fetchval("SELECT count(*) FROM chat_sessions WHERE user_id = $1", bob.id) == 0


async def test_import_for_an_unknown_user_or_file(database_url, tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    path.write_text('{"format": "chatproxy.session.v1", "session": {}, "messages": []}')
    done = await cli(database_url, "sessions", "import", str(path), "--user", "nobody-here")
    assert done.returncode == 1
    assert done.stderr.decode().endswith("chatproxy: no user 'nobody-here'\n")
    done = await cli(database_url, "sessions", "import", str(tmp_path / "missing.json"),
                     "--user", "nobody-here")
    assert done.returncode == 1


# --- cleanup ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def job_db(server_url: str) -> AsyncIterator[str]:
    """A database of its own: the job acts on every session in the database it is given."""
    async with fresh_database(server_url) as url:
        yield url


@pytest.fixture
async def job_conn(job_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await with_codec(await asyncpg.connect(job_db))
    await conn.execute("DELETE FROM chat_sessions")
    try:
        yield conn
    finally:
        await conn.close()


async def age(conn: asyncpg.Connection, session_id: str, days: int, deleted: bool = False) -> None:
    moment = datetime.now(UTC) - timedelta(days=days)
    await conn.execute(
        "UPDATE chat_sessions SET created_at = $2, updated_at = $2, deleted_at = $3, "
        "is_active = NOT $4 WHERE id = $1", session_id, moment, moment if deleted else None,
        deleted)


CUTOFF_LINE = re.compile(
    r"retention: sessions inactive or deleted before \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


async def test_cleanup_prints_what_it_removed(job_db, job_conn) -> None:
    owner = await make_user(job_conn)
    old = await convo(job_conn, owner)
    await age(job_conn, old, 30)
    gone = await convo(job_conn, owner)
    await age(job_conn, gone, 20, deleted=True)
    month_old = await convo(job_conn, owner)
    await age(job_conn, month_old, 3)
    fresh = await convo(job_conn, owner)

    done = await cli(job_db, "cleanup", "--older-than", "10d")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert CUTOFF_LINE.fullmatch(lines[0]), lines[0]
    assert lines[1:] == [
        f"deleted 1 inactive and 1 soft-deleted sessions, with {2 * len(CONVO)} messages",
        "deleted 0 stored responses created before then",
        "pruning: off",
        "deleted 0 expired idempotency keys",
    ]
    left = {r["id"] for r in await job_conn.fetch("SELECT id FROM chat_sessions")}
    assert left == {month_old, fresh}

    # The configured retention (here 2 days) and pruning to the newest 2 messages.
    done = await cli(job_db, "cleanup", CHATPROXY_RETENTION_DAYS="2",
                     CHATPROXY_MAX_STORED_MESSAGES="2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert CUTOFF_LINE.fullmatch(lines[0])
    # CONVO ends "assistant, user, assistant": the newest whole units within 2 are its last two.
    assert lines[1:] == [
        f"deleted 1 inactive and 0 soft-deleted sessions, with {len(CONVO)} messages",
        "deleted 0 stored responses created before then",
        f"pruned {len(CONVO) - 2} messages from 1 sessions (keeping the newest 2 per session)",
        "deleted 0 expired idempotency keys",
    ]
    assert [r["seq"] for r in await job_conn.fetch(
        "SELECT seq FROM chat_messages WHERE session_id = $1 ORDER BY seq", fresh)] == [6, 7]

    done = await cli(job_db, "cleanup", CHATPROXY_RETENTION_DAYS="0")
    assert done.stdout.decode().splitlines() == [
        "retention: off (sessions are kept however old)",
        "pruning: off",
        "deleted 0 expired idempotency keys",
    ]


async def test_cleanup_refuses_a_bad_duration(job_db) -> None:
    done = await cli(job_db, "cleanup", "--older-than", "7 days")
    assert done.returncode == 2
    assert "--older-than: expected a duration like 30s, 12h or 7d" in done.stderr.decode()
