"""The turn engine without HTTP (proxy/turns/): what a door that is not a route gets from it.

A door such as MCP's `send_message` knows its caller by user id and wants the reply message; the
Responses API wants each streamed chunk parsed, and a write of its own in the turn's
transaction. The upstream is respx; the database is real.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import asyncpg
import httpx
import pytest
import respx

from proxy import auth
from proxy.config import Settings
from proxy.errors import SessionNotFound, Unauthorized
from proxy.runtime import Runtime
from proxy.turns import (
    Answered,
    Caller,
    Idempotency,
    Passthrough,
    Replayed,
    StoredTurn,
    Streaming,
    TurnRequest,
    request_hash,
    run_turn,
)
from proxy.upstream import make_client
from tests.conftest import User
from tests.turns import completion, runtime_on, session_of, u

SSE = {"content-type": "text/event-stream"}


@pytest.fixture
async def rt(settings: Settings, database_url: str, upstream: respx.Router
             ) -> AsyncIterator[Runtime]:
    http = make_client(settings, transport=httpx.MockTransport(upstream.async_handler))
    async with runtime_on(settings, database_url, http) as runtime:
        yield runtime


async def rows(db: asyncpg.Connection, sid: str) -> list[tuple[str, Any, str]]:
    found = await db.fetch(
        "SELECT role, body, status FROM chat_messages WHERE session_id = $1 ORDER BY seq", sid)
    return [(r["role"], json.loads(r["body"])["content"], r["status"]) for r in found]


def ask(caller: Caller, sid: str, text: str, **fields: Any) -> TurnRequest:
    body = {"model": "gpt-4o", "messages": [u(text)], **fields}
    return TurnRequest(caller, sid, body, stream=fields.get("stream") is True)


def chunk(content: str) -> bytes:
    data = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {
        "content": content}, "finish_reason": None}]}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def test_a_caller_known_by_user_id_gets_the_reply_message_and_the_turn_is_stored(
    rt: Runtime, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("first")))
    sid = await session_of(db, alice)
    request = ask(Caller(user_id=alice.id), sid, "hello")
    outcome = await run_turn(rt, request)
    assert isinstance(outcome, Answered)
    assert outcome.reply == {"role": "assistant", "content": "first"}
    assert outcome.answer["choices"][0]["message"]["content"] == "first"
    assert json.loads(outcome.raw) == outcome.answer
    assert (outcome.headers["x-session-id"], outcome.headers["x-history-messages"]) == (sid, "0")
    assert request.state["user_id"] == alice.id and request.state["session_id"] == sid
    assert await rows(db, sid) == [("user", "hello", "complete"),
                                   ("assistant", "first", "complete")]
    # The next turn, by key this time, gets that history.
    route.mock(return_value=httpx.Response(200, json=completion("second")))
    outcome = await run_turn(rt, ask(Caller(key_hash=auth.hash_key(alice.key)), sid, "again"))
    assert isinstance(outcome, Answered) and outcome.headers["x-history-messages"] == "2"
    sent = json.loads(route.calls.last.request.content)["messages"]
    assert [m["content"] for m in sent] == ["hello", "first", "again"]


async def test_an_unknown_user_or_another_users_session_runs_nothing(
    rt: Runtime, upstream: respx.Router, alice: User, bob: User, db: asyncpg.Connection
) -> None:
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion()))
    sid = await session_of(db, alice)
    with pytest.raises(Unauthorized, match="Unknown user"):
        await run_turn(rt, ask(Caller(user_id="user_nobody"), sid, "x"))
    with pytest.raises(SessionNotFound):
        await run_turn(rt, ask(Caller(user_id=bob.id), sid, "x"))
    assert not route.called and await rows(db, sid) == []


async def test_a_stream_hands_out_each_chunk_parsed_and_stores_the_turn_before_done(
    rt: Runtime, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    body = chunk("Hel") + b": keep-alive\n\n" + chunk("lo") + b"data: [DONE]\n\n"
    upstream.post("/chat/completions").mock(return_value=httpx.Response(200, headers=SSE,
                                                                        content=body))
    sid = await session_of(db, alice)
    outcome = await run_turn(rt, ask(Caller(user_id=alice.id), sid, "hi", stream=True))
    assert isinstance(outcome, Streaming)
    assert outcome.headers["cache-control"] == "no-cache"
    seen = []
    async with aclosing(outcome.events) as events:
        async for event in events:
            if event.done:
                assert await rows(db, sid) == [("user", "hi", "complete"),
                                               ("assistant", "Hello", "complete")]
            seen.append((event.raw, event.chunk and event.chunk["choices"][0]["delta"],
                         event.done, event.error))
    assert seen == [
        (chunk("Hel"), {"content": "Hel"}, False, None),
        (b": keep-alive\n\n", None, False, None),
        (chunk("lo"), {"content": "lo"}, False, None),
        (b"data: [DONE]\n\n", None, True, None),
    ]


async def test_an_extra_write_runs_in_the_turns_transaction_and_sees_the_turn(
    rt: Runtime, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("ok")))
    sid = await session_of(db, alice)
    seen: list[tuple[bool, int, StoredTurn]] = []

    async def extra(conn: asyncpg.Connection, turn: StoredTurn) -> None:
        count = await conn.fetchval(
            "SELECT count(*) FROM chat_messages WHERE session_id = $1", turn.session_id)
        seen.append((conn.is_in_transaction(), count, turn))

    request = ask(Caller(user_id=alice.id), sid, "hi")
    request.extra_write = extra
    assert isinstance(await run_turn(rt, request), Answered)
    [(in_transaction, count, turn)] = seen
    assert (in_transaction, count, turn.session_id, turn.status) == (True, 2, sid, "complete")
    assert [m.message for m in turn.messages] == [u("hi"), {"role": "assistant",
                                                            "content": "ok"}]

    async def failing(conn: asyncpg.Connection, turn: StoredTurn) -> None:
        raise asyncpg.PostgresError("the door's own write failed")

    request = ask(Caller(user_id=alice.id), sid, "again")
    request.extra_write = failing
    with pytest.raises(asyncpg.PostgresError):
        await run_turn(rt, request)
    assert len(await rows(db, sid)) == 2  # one transaction: the turn went with it


async def test_an_idempotent_turn_replays_and_an_upstream_error_gives_the_key_back(
    rt: Runtime, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=[
        httpx.Response(429, json={"error": {"message": "slow down"}}),
        httpx.Response(200, json=completion("once")),
    ])
    sid = await session_of(db, alice)

    def once() -> TurnRequest:
        request = ask(Caller(user_id=alice.id), sid, "hi")
        request.idempotency = Idempotency("key-1", request_hash(sid, b"the same body"))
        return request

    failed = await run_turn(rt, once())
    assert isinstance(failed, Passthrough) and failed.status == 429
    answered = await run_turn(rt, once())  # the key was given back: this one runs
    assert isinstance(answered, Answered)
    replayed = await run_turn(rt, once())
    assert isinstance(replayed, Replayed)
    assert (replayed.answer.status_code, replayed.answer.body) == (200, answered.raw)
    assert replayed.answer.headers == answered.headers
    assert route.call_count == 2 and len(await rows(db, sid)) == 2
