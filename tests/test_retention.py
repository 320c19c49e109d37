"""The retention job and pruning, on a database of their own with a clock the tests control."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import respx
from litestar.testing import AsyncTestClient

from proxy import db as proxy_db
from proxy import retention
from proxy.app import create_app
from proxy.config import Settings
from proxy.retention import Report
from proxy.store import messages, sessions
from proxy.store import retention as retention_sql
from proxy.store.messages import NewMessage
from proxy.upstream import make_client
from tests.conftest import User, fresh_database, make_user

WEEK = timedelta(days=7)
SECOND = timedelta(seconds=1)


@pytest.fixture(scope="module")
async def rdb(server_url: str) -> AsyncIterator[str]:
    async with fresh_database(server_url) as url:
        yield url


async def connect(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url)
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")
    return conn


@pytest.fixture
async def conn(rdb: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the job's database, emptied of sessions before each test."""
    c = await connect(rdb)
    await c.execute("DELETE FROM chat_sessions")
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def other(rdb: str) -> AsyncIterator[asyncpg.Connection]:
    """A second connection: a concurrent turn, or another process."""
    c = await connect(rdb)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def owner(conn: asyncpg.Connection) -> User:
    return await make_user(conn)


ROLE = {"u": "user", "a": "assistant", "c": "assistant", "t": "tool"}


def shaped(pattern: str) -> list[NewMessage]:
    """Messages from a pattern: u user, a assistant, c assistant with tool_calls, t tool."""
    result = []
    for i, letter in enumerate(pattern):
        message: dict[str, Any] = {"role": ROLE[letter], "content": f"m{i}"}
        if letter == "c":
            message["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                                      "function": {"name": "f", "arguments": "{}"}}]
        if letter == "t":
            message["tool_call_id"] = "call_x"
        result.append(NewMessage(message, tokens=i + 1))
    return result


async def plant(conn: asyncpg.Connection, owner: User, *, active_at: datetime,
                deleted_at: datetime | None = None, pattern: str = "") -> str:
    """A session whose last activity was `active_at` (soft-deleted at `deleted_at`)."""
    session = await sessions.create_session(conn, owner.id, {"max_history_messages": 20})
    if pattern:
        await messages.store_turn(conn, session["id"], shaped(pattern))
    await conn.execute(
        "UPDATE chat_sessions SET updated_at = $2::timestamptz, "
        "created_at = $2::timestamptz - interval '1 day', deleted_at = $3, "
        "is_active = ($3::timestamptz IS NULL) WHERE id = $1",
        session["id"], active_at, deleted_at)
    return str(session["id"])


async def remaining(conn: asyncpg.Connection) -> set[str]:
    return {r["id"] for r in await conn.fetch("SELECT id FROM chat_sessions")}


async def run(conn: asyncpg.Connection, now: datetime, *, keep: int = 0,
              retention_: timedelta | None = WEEK, batch: int = retention.BATCH,
              batch_messages: int = retention.BATCH_MESSAGES) -> Report:
    return await asyncio.wait_for(retention.cleanup(
        conn, now=now, retention=retention_, keep=keep, batch=batch,
        batch_messages=batch_messages), 60)


# --- the retention window ---------------------------------------------------------------------


async def test_sessions_just_inside_and_just_outside_the_window(conn, owner) -> None:
    now = datetime.now(UTC)
    cutoff = now - WEEK
    expired = await plant(conn, owner, active_at=cutoff - SECOND, pattern="uaua")
    at_cutoff = await plant(conn, owner, active_at=cutoff)
    recent = await plant(conn, owner, active_at=cutoff + SECOND, pattern="ua")
    deleted_long_ago = await plant(conn, owner, active_at=cutoff - SECOND,
                                   deleted_at=cutoff - SECOND, pattern="u")
    deleted_lately = await plant(conn, owner, active_at=cutoff + SECOND,
                                 deleted_at=cutoff + SECOND)
    # Soft-deleted before the cutoff, though a late write touched it since: purged.
    deleted_then_touched = await plant(conn, owner, active_at=now, deleted_at=cutoff - SECOND)

    report = await run(conn, now)

    assert report == Report(ran=True, cutoff=cutoff, keep=0, inactive_sessions=1,
                            deleted_sessions=2, messages=5)
    assert await remaining(conn) == {at_cutoff, recent, deleted_lately}
    gone = [expired, deleted_long_ago, deleted_then_touched]
    assert await conn.fetchval("SELECT count(*) FROM chat_messages WHERE session_id = ANY($1)",
                               gone) == 0
    assert await conn.fetchval("SELECT count(*) FROM chat_messages WHERE session_id = $1",
                               recent) == 2


async def test_expired_sessions_go_in_small_batches(conn, owner) -> None:
    now = datetime.now(UTC)
    for _ in range(25):
        await plant(conn, owner, active_at=now - WEEK - timedelta(days=1), pattern="u")
    kept = await plant(conn, owner, active_at=now)
    statements: list[str] = []
    conn.add_query_logger(lambda q: statements.append(q.query))
    report = await run(conn, now, batch=10)
    assert (report.inactive_sessions, report.messages) == (25, 25)
    assert await remaining(conn) == {kept}
    # 10 + 10 + 5, then one that finds nothing: each batch its own statement.
    assert statements.count(retention_sql._PURGE_ALL) == 4


async def test_a_batch_holds_few_messages_but_at_least_one_session(conn, owner) -> None:
    now = datetime.now(UTC)
    for pattern in ("uauaua", "ua", "u", "uaua"):
        await plant(conn, owner, active_at=now - WEEK - SECOND, pattern=pattern)
    statements: list[str] = []
    conn.add_query_logger(lambda q: statements.append(q.query))
    report = await run(conn, now, batch=10, batch_messages=4)
    assert (report.inactive_sessions, report.messages) == (4, 13)
    assert await remaining(conn) == set()
    # Whatever order the sessions come in, a batch of 4 messages holds at most two of them
    # (or one longer one): more than two statements, and one that finds nothing.
    assert 3 <= statements.count(retention_sql._PURGE_ALL) - 1 <= 4


async def test_retention_off_keeps_everything(conn, owner) -> None:
    now = datetime.now(UTC)
    old = await plant(conn, owner, active_at=now - timedelta(days=3650),
                      deleted_at=now - timedelta(days=3650))
    report = await run(conn, now, retention_=None)
    assert report == Report(ran=True, cutoff=None)
    assert await remaining(conn) == {old}


def test_retention_of_settings() -> None:
    assert retention.retention_of(Settings(retention_days=7)) == WEEK
    assert retention.retention_of(Settings(retention_days=0)) is None
    assert retention.retention_of(Settings(retention_days=0), timedelta(hours=12)) == timedelta(
        hours=12)


@pytest.mark.parametrize(("text", "value"), [
    ("30s", timedelta(seconds=30)), ("15m", timedelta(minutes=15)),
    ("12h", timedelta(hours=12)), ("7d", WEEK), ("2w", timedelta(days=14)),
    (" 36500d ", timedelta(days=36500)),
])
def test_durations(text: str, value: timedelta) -> None:
    assert retention.parse_duration(text) == value


@pytest.mark.parametrize("text", ["", "7", "d", "0s", "-1d", "1.5h", "7 d", "36501d", "1y"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        retention.parse_duration(text)


# --- concurrency ------------------------------------------------------------------------------


async def test_a_turn_being_stored_during_cleanup_keeps_its_session(conn, other, owner) -> None:
    now = datetime.now(UTC)
    busy = await plant(conn, owner, active_at=now - WEEK - timedelta(days=1), pattern="ua")
    idle = await plant(conn, owner, active_at=now - WEEK - timedelta(days=1))
    turn = other.transaction()
    await turn.start()
    # The turn's write holds the session row's lock until it commits.
    stored = await messages.store_turn(other, busy, shaped("ua"))
    assert stored == 2
    try:
        report = await run(conn, now)  # does not wait for the turn: skips its session
        assert (report.inactive_sessions, report.messages) == (1, 0)
        assert await remaining(conn) == {busy}
    finally:
        await turn.commit()
    report = await run(conn, datetime.now(UTC))  # the turn made the session recent again
    assert report.inactive_sessions == 0
    assert await remaining(conn) == {busy}
    assert await conn.fetchval("SELECT count(*) FROM chat_messages WHERE session_id = $1",
                               busy) == 4
    assert idle not in await remaining(conn)


async def test_a_locked_session_is_deleted_once_the_lock_goes(conn, other, owner) -> None:
    now = datetime.now(UTC)
    session = await plant(conn, owner, active_at=now - WEEK - timedelta(days=1))
    async with other.transaction():
        await other.execute("SELECT 1 FROM chat_sessions WHERE id = $1 FOR UPDATE", session)
        assert (await run(conn, now)).inactive_sessions == 0
    # The lock holder wrote nothing (a turn that failed): the session is still expired.
    assert (await run(conn, now)).inactive_sessions == 1
    assert await remaining(conn) == set()


async def test_one_process_at_a_time(conn, other, owner) -> None:
    now = datetime.now(UTC)
    session = await plant(conn, owner, active_at=now - WEEK - timedelta(days=1))
    await other.execute("SELECT pg_advisory_lock($1)", retention.RETENTION_LOCK)
    try:
        report = await run(conn, now)
        assert report == Report(ran=False, cutoff=now - WEEK)
        assert report.lines() == [
            "another process is running the retention job; nothing removed"]
        assert await remaining(conn) == {session}
    finally:
        await other.execute("SELECT pg_advisory_unlock($1)", retention.RETENTION_LOCK)
    assert (await run(conn, now)).inactive_sessions == 1
    # The job let its lock go: another connection can take it.
    assert await other.fetchval("SELECT pg_try_advisory_lock($1)", retention.RETENTION_LOCK)
    await other.execute("SELECT pg_advisory_unlock($1)", retention.RETENTION_LOCK)


# --- pruning ----------------------------------------------------------------------------------

PATTERNS = ["uauaua", "ucttauctta", "ucttttau", "uctt", "ttuaua", "uacttta", "uu"]


async def stored(conn: asyncpg.Connection, session_id: str) -> list[tuple[int, str, int]]:
    rows = await conn.fetch("SELECT seq, role, tokens FROM chat_messages WHERE session_id = $1 "
                            "ORDER BY seq", session_id)
    return [(r["seq"], r["role"], r["tokens"]) for r in rows]


def is_opener(message: tuple[int, str, int]) -> bool:
    return message[1] != "tool"


async def check_counters(conn: asyncpg.Connection, session_id: str) -> None:
    row = await conn.fetchrow(
        "SELECT s.message_count, s.total_tokens, count(m.seq) AS n, "
        "COALESCE(sum(m.tokens), 0) AS t FROM chat_sessions s "
        "LEFT JOIN chat_messages m ON m.session_id = s.id WHERE s.id = $1 "
        "GROUP BY s.message_count, s.total_tokens", session_id)
    assert (row["message_count"], row["total_tokens"]) == (row["n"], row["t"])


@pytest.mark.parametrize("pattern", PATTERNS)
async def test_pruning_keeps_whole_units_and_never_an_orphan(conn, owner, pattern) -> None:
    now = datetime.now(UTC)
    for keep in range(1, len(pattern) + 2):
        session = await plant(conn, owner, active_at=now, pattern=pattern)
        before = await stored(conn, session)
        pruned = await retention.prune_session(conn, session, keep)
        after = await stored(conn, session)
        assert pruned == len(before) - len(after)
        assert after == before[len(before) - len(after):]  # a suffix: the newest messages
        await check_counters(conn, session)
        if len(before) <= keep:
            assert after == before
            continue
        assert after and is_opener(after[0])  # no tool message without its assistant
        openers = [i for i, m in enumerate(before) if is_opener(m)]
        start = len(before) - len(after)
        if len(after) > keep:  # only the newest unit, kept whole
            assert start == openers[-1]
        else:  # as many whole units as fit: the next older unit would not
            older = [i for i in openers if i < start]
            assert not older or len(before) - older[-1] > keep


async def test_pruning_a_session_being_written_waits_for_the_next_time(conn, other,
                                                                       owner) -> None:
    session = await plant(conn, owner, active_at=datetime.now(UTC), pattern="uauaua")
    async with other.transaction():
        await other.execute("SELECT 1 FROM chat_sessions WHERE id = $1 FOR UPDATE", session)
        assert await retention.prune_session(conn, session, 2) == 0
    assert await retention.prune_session(conn, session, 2) == 4
    assert [m[0] for m in await stored(conn, session)] == [5, 6]


async def test_the_job_prunes_every_long_session(conn, owner) -> None:
    now = datetime.now(UTC)
    long_one = await plant(conn, owner, active_at=now, pattern="uauauaua")
    with_tools = await plant(conn, owner, active_at=now, pattern="ucttaua")
    short = await plant(conn, owner, active_at=now, pattern="ua")
    report = await run(conn, now, keep=3, batch=2)
    assert report == Report(ran=True, cutoff=now - WEEK, keep=3, pruned_sessions=2,
                            pruned_messages=5 + 4)
    assert [m[0] for m in await stored(conn, long_one)] == [6, 7, 8]
    assert [m[1] for m in await stored(conn, with_tools)] == ["assistant", "user", "assistant"]
    assert len(await stored(conn, short)) == 2
    for session in (long_one, with_tools, short):
        await check_counters(conn, session)


def completion(message: dict[str, Any]) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}


@pytest.fixture
def job_settings(settings: Settings, rdb: str) -> Settings:
    return replace(settings, database_url=rdb, max_stored_messages=3)


async def test_pruning_after_each_turn(job_settings, conn, owner) -> None:
    upstream = respx.Router(base_url="http://upstream.test/v1", assert_all_called=False)
    upstream.post("/chat/completions").mock(side_effect=[
        httpx.Response(200, json=completion({"role": "assistant", "content": None,
                                             "tool_calls": [{"id": "call_1",
                                                             "type": "function",
                                                             "function": {"name": "f",
                                                                          "arguments": "{}"}}]})),
        httpx.Response(200, json=completion({"role": "assistant", "content": "done"})),
    ])
    http = make_client(job_settings, transport=httpx.MockTransport(upstream.async_handler))
    app = create_app(job_settings, http_client=http)
    session = await sessions.create_session(conn, owner.id, {"max_history_messages": 20})
    sid = session["id"]
    try:
        async with AsyncTestClient(app=app, base_url="http://proxy.test") as client:
            r = await client.post("/v1/chat/completions", headers=owner.headers, json={
                "model": "gpt-4o", "session_id": sid,
                "messages": [{"role": "user", "content": "go"}]})
            assert r.status_code == 200, r.text
            assert [m[1] for m in await stored(conn, sid)] == ["user", "assistant"]
            r = await client.post("/v1/chat/completions", headers=owner.headers, json={
                "model": "gpt-4o", "session_id": sid,
                "messages": [{"role": "tool", "tool_call_id": "call_1", "content": "r"}]})
            assert r.status_code == 200, r.text
    finally:
        await http.aclose()
    # user, assistant(tool_calls), tool, assistant: the oldest message goes, the exchange
    # stays whole.
    assert [m[:2] for m in await stored(conn, sid)] == [(2, "assistant"), (3, "tool"),
                                                        (4, "assistant")]
    await check_counters(conn, sid)


# --- the in-process job -----------------------------------------------------------------------


async def test_the_hourly_loop_runs_the_job(job_settings, conn, owner) -> None:
    session = await plant(conn, owner, active_at=datetime.now(UTC) - timedelta(days=30))
    pool = await proxy_db.create_pool(job_settings.database_url or "", job_settings)
    job = asyncio.create_task(retention.run_hourly(pool, job_settings, first_delay=0))
    try:
        for _ in range(600):
            if session not in await remaining(conn):
                break
            await asyncio.sleep(0.05)
        assert session not in await remaining(conn)
        assert not job.done()
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        await pool.close()
    assert job.cancelled()


async def test_the_server_runs_the_job_while_it_serves(job_settings, monkeypatch) -> None:
    seen: list[str] = []

    async def fake_job(pool: asyncpg.Pool, settings: Settings) -> None:
        seen.append("started")
        try:
            await asyncio.Event().wait()
        finally:
            seen.append("stopped")

    monkeypatch.setattr(retention, "run_hourly", fake_job)
    app = create_app(job_settings, http_client=httpx.AsyncClient())
    async with AsyncTestClient(app=app, base_url="http://proxy.test") as client:
        assert (await client.get("/health")).status_code == 200
        assert seen == ["started"]
    assert seen == ["started", "stopped"]
