"""Stored responses (proxy/store/responses.py) on a database of their own: chains read newest
first within a window, a deleted response ends its chains there, the retention job purges old
responses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from proxy import auth, retention
from proxy.errors import SessionGone
from proxy.store import responses
from proxy.store.messages import NewMessage
from tests.conftest import User, fresh_database, make_user


@pytest.fixture(scope="module")
async def sdb(server_url: str) -> AsyncIterator[str]:
    async with fresh_database(server_url) as url:
        yield url


@pytest.fixture
async def conn(sdb: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(sdb)
    try:
        yield c
    finally:
        await c.close()


async def respond(conn: asyncpg.Connection, user: User, rid: str, previous: str | None,
                  *texts: str) -> None:
    messages = [NewMessage({"role": "user" if i % 2 == 0 else "assistant", "content": t}, 5)
                for i, t in enumerate(texts)]
    await responses.insert_response(conn, responses.NewResponse(
        rid, user.id, previous, None, "complete", "stop", None, 10, {"model": "m"},
        int(datetime.now(UTC).timestamp())), messages)


async def history(conn: asyncpg.Connection, user: User, rid: str, limit: int) -> list[str]:
    ctx = await responses.read_chain(conn, auth.hash_key(user.key), rid, limit)
    assert ctx is not None and ctx.session_found
    assert [m.seq for m in ctx.history] == sorted(m.seq for m in ctx.history)
    return [json.loads(m.body)["content"] for m in ctx.history]


async def test_a_chain_is_read_newest_first_within_its_window_and_branches(
    conn: asyncpg.Connection
) -> None:
    user = await make_user(conn)
    previous = None
    for n in range(5):
        await respond(conn, user, f"resp_c{n}", previous, f"q{n}", f"a{n}")
        previous = f"resp_c{n}"
    assert await history(conn, user, "resp_c4", 100) == [
        x for n in range(5) for x in (f"q{n}", f"a{n}")]
    assert await history(conn, user, "resp_c4", 3) == ["a3", "q4", "a4"]
    assert await history(conn, user, "resp_c2", 100) == ["q0", "a0", "q1", "a1", "q2", "a2"]
    assert await history(conn, user, "resp_c4", 0) == []
    # the same id again (a retried write) stores nothing new
    await respond(conn, user, "resp_c4", "resp_c3", "other", "other")
    assert await history(conn, user, "resp_c4", 2) == ["q4", "a4"]
    # a deleted response ends the chains through it
    assert await responses.delete_response(conn, user.id, "resp_c1")
    assert await history(conn, user, "resp_c4", 100) == ["q2", "a2", "q3", "a3", "q4", "a4"]
    # another user's response, or a key that is not one
    stranger = await make_user(conn)
    ctx = await responses.read_chain(conn, auth.hash_key(stranger.key), "resp_c4", 10)
    assert ctx is not None and (ctx.session_found, ctx.history) == (False, [])
    assert await responses.read_chain(conn, auth.hash_key("sk-cp-nobody"), "resp_c4", 10) is None
    assert not await responses.delete_response(conn, stranger.id, "resp_c4")


async def test_the_retention_job_deletes_responses_older_than_the_period(
    conn: asyncpg.Connection
) -> None:
    user = await make_user(conn)
    await respond(conn, user, "resp_old", None, "q", "a")
    await respond(conn, user, "resp_new", None, "q", "a")
    await conn.execute("UPDATE responses SET created_at = now() - interval '8 days' "
                       "WHERE id = 'resp_old'")
    report = await asyncio.wait_for(retention.cleanup(
        conn, now=datetime.now(UTC), retention=timedelta(days=7), keep=0), 60)
    assert report.responses == 1
    assert "deleted 1 stored responses created before then" in report.lines()
    left = {r["id"] for r in await conn.fetch(
        "SELECT id FROM responses WHERE user_id = $1", user.id)}
    assert left == {"resp_new"}
    assert await conn.fetchval(
        "SELECT count(*) FROM response_messages WHERE response_id = 'resp_old'") == 0


async def test_a_response_in_a_conversation_and_its_turn_are_one_write_never_two(
    conn: asyncpg.Connection
) -> None:
    user = await make_user(conn)
    sid = "sess_" + user.id.removeprefix("user_")
    await conn.execute("INSERT INTO chat_sessions (id, user_id, max_history_messages) "
                       "VALUES ($1, $2, 20)", sid, user.id)
    turn = [NewMessage({"role": "user", "content": "q"}, 5),
            NewMessage({"role": "assistant", "content": "a"}, 4)]
    response = responses.NewResponse("resp_t1", user.id, None, sid, "complete", "stop", None,
                                     10, {"model": "m"}, 1)
    assert await responses.insert_response(conn, response, turn, with_turn=True)
    # the same write again (retried after its outcome was unknown): nothing more
    assert not await responses.insert_response(conn, response, turn, with_turn=True)
    rows = await conn.fetch("SELECT seq, body, tokens FROM chat_messages WHERE session_id = $1 "
                            "ORDER BY seq", sid)
    assert [(r["seq"], json.loads(r["body"])["content"], r["tokens"]) for r in rows] == [
        (1, "q", 5), (2, "a", 4)]
    session = await conn.fetchrow("SELECT message_count, total_tokens, next_seq "
                                  "FROM chat_sessions WHERE id = $1", sid)
    assert tuple(session) == (2, 9, 3)
    assert await conn.fetchval("SELECT session_id FROM responses WHERE id = 'resp_t1'") == sid
    # a conversation deleted (soft, then purged) meanwhile: neither the response nor the turn
    gone = responses.NewResponse("resp_t2", user.id, None, sid, "complete", "stop", None,
                                 10, {"model": "m"}, 1)
    for deletion in ("UPDATE chat_sessions SET is_active = false WHERE id = $1",
                     "DELETE FROM chat_sessions WHERE id = $1"):
        await conn.execute(deletion, sid)
        with pytest.raises(SessionGone):
            await responses.insert_response(conn, gone, turn, with_turn=True)
        assert await conn.fetchval("SELECT count(*) FROM responses WHERE id = 'resp_t2'") == 0
        assert await conn.fetchval(
            "SELECT count(*) FROM chat_messages WHERE session_id = $1", sid) == (
            0 if deletion.startswith("DELETE") else 2)
