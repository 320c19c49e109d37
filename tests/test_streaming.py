"""Streamed turns (contract §6): relayed byte for byte, assembled, stored before `[DONE]`.

The upstream is respx answering with a real async byte stream, so chunks arrive one by one and a
stream can break off, stall or be abandoned. Some tests drive the relay generator directly to
look at the database at the exact moment an event is handed to the client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import asyncpg
import httpx
import pytest
import respx

from proxy.config import Settings
from proxy.errors import DatabaseUnavailable
from proxy.runtime import Runtime
from proxy.store import messages
from proxy.store.messages import NewMessage
from proxy.turns import stream
from proxy.turns.write import Turn, persist
from tests.conftest import User
from tests.turns import (
    Client,
    chat,
    new_session,
    runtime_on,
    sent,
    session_of,
    settle,
    stored,
    u,
)

DONE = b"data: [DONE]\n\n"
SSE = {"content-type": "text/event-stream; charset=utf-8"}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
          **extra: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o", "choices": [choice], **extra}


def event(value: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(value).encode() + b"\n\n"


def hello(*words: str) -> list[bytes]:
    """A stream's events: the role, one content delta per word, the finish."""
    return [
        event(chunk({"role": "assistant", "content": ""})),
        *(event(chunk({"content": w})) for w in words),
        event(chunk(finish="stop")),
    ]


class Upstream(httpx.AsyncByteStream):
    """Yields its parts one by one: bytes are sent, an Exception is raised, an asyncio.Event is
    waited for (the test decides when the upstream goes on), a float is slept."""

    def __init__(self, *parts: bytes | Exception | asyncio.Event | float):
        self.parts = parts
        self.closed = False
        self.waiting = asyncio.Event()  # set while the upstream waits on one of its events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            if isinstance(part, bytes):
                yield part
            elif isinstance(part, Exception):
                raise part
            elif isinstance(part, asyncio.Event):
                self.waiting.set()
                await part.wait()
                self.waiting.clear()
            else:
                await asyncio.sleep(part)

    async def aclose(self) -> None:
        self.closed = True


def streaming(body: Upstream, status: int = 200,
              headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers or SSE, stream=body)


async def stream_chat(client: Client, user: User, sid: str, *msgs: dict[str, Any],
                      **fields: Any) -> httpx.Response:
    return await chat(client, user, sid, *msgs, stream=True, **fields)


def error_event(message: str, code: str = "upstream_error") -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


# --- through the app ----------------------------------------------------------------------------


async def test_chunks_reach_the_client_byte_for_byte_and_the_reply_is_stored(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    events = hello("Hel", "lo", " wörld")
    raw = b"".join(events) + DONE
    # Cut anywhere: inside an event, between events, several events in one chunk, and
    # keep-alive comments between them.
    pieces = [raw[:7], raw[7:60], b": keep-alive\n\n", raw[60:61], raw[61:200], raw[200:]]
    upstream.post("/chat/completions").mock(return_value=streaming(Upstream(*pieces)))
    sid = await new_session(client, alice)
    r = await stream_chat(client, alice, sid, u("hi"))
    assert r.status_code == 200
    assert r.content == b"".join(pieces)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert (r.headers["x-session-id"], r.headers["x-history-messages"]) == (sid, "0")
    listed = await stored(client, alice, sid)
    assert listed == [
        {"seq": 1, "role": "user", "content": "hi", "tokens": listed[0]["tokens"],
         "status": "complete"},
        {"seq": 2, "role": "assistant", "content": "Hello wörld",
         "tokens": listed[1]["tokens"], "status": "complete"},
    ]


async def test_tool_calls_refusal_and_content_are_assembled_by_index(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    def call(index: int, **fields: Any) -> bytes:
        return event(chunk({"tool_calls": [{"index": index, **fields}]}))

    events = [
        event(chunk({"role": "assistant", "content": None})),
        call(0, id="call_a", type="function", function={"name": "weather", "arguments": ""}),
        call(1, id="call_b", type="function", function={"name": "time", "arguments": '{"tz'}),
        call(0, function={"arguments": '{"city": '}),
        call(1, function={"arguments": '": "UTC"}'}),
        call(0, function={"arguments": '"Paris"}'}),
        event(chunk(finish="tool_calls")),
        DONE,
    ]
    refusal = [
        event(chunk({"role": "assistant", "content": None, "refusal": ""})),
        event(chunk({"refusal": "I can't"})),
        event(chunk({"refusal": " do that."})),
        event(chunk(finish="stop")),
        DONE,
    ]
    route = upstream.post("/chat/completions").mock(side_effect=[
        streaming(Upstream(*events)), streaming(Upstream(*refusal)),
        streaming(Upstream(*hello("fine"), DONE)),
    ])
    sid = await new_session(client, alice)
    await stream_chat(client, alice, sid, u("weather and time?"))
    calls = [
        {"id": "call_a", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function",
         "function": {"name": "time", "arguments": '{"tz": "UTC"}'}},
    ]
    results = [{"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
               {"role": "tool", "tool_call_id": "call_b", "content": "12:00"}]
    await stream_chat(client, alice, sid, *results)
    assert sent(route)["messages"] == [
        u("weather and time?"),
        {"role": "assistant", "content": None, "tool_calls": calls},
        *results,
    ]
    await stream_chat(client, alice, sid, u("next"))
    assert sent(route)["messages"][-2:] == [
        {"role": "assistant", "content": None, "refusal": "I can't do that."}, u("next")]
    listed = await stored(client, alice, sid)
    assert [(m["role"], m["status"]) for m in listed] == [
        ("user", "complete"), ("assistant", "complete"), ("tool", "complete"),
        ("tool", "complete"), ("assistant", "complete"), ("user", "complete"),
        ("assistant", "complete")]
    assert listed[1]["tool_calls"] == calls
    assert listed[4]["refusal"] == "I can't do that."
    assert listed[6]["content"] == "fine"


async def test_usage_from_the_stream_counts_the_reply(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    usage = chunk(usage={"prompt_tokens": 3, "completion_tokens": 40, "total_tokens": 43})
    usage["choices"] = []
    body = [*hello("a", "b"), event(usage), DONE]
    upstream.post("/chat/completions").mock(return_value=streaming(Upstream(*body)))
    sid = await new_session(client, alice)
    r = await stream_chat(client, alice, sid, u("hi"),
                          stream_options={"include_usage": True})
    assert r.content == b"".join(body)
    assert (await stored(client, alice, sid))[1]["tokens"] == 43


async def test_an_upstream_break_mid_stream_stores_an_incomplete_turn_and_ends_with_an_error(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    events = hello("Par", "tial")[:3]
    route = upstream.post("/chat/completions").mock(side_effect=[
        streaming(Upstream(*events, httpx.RemoteProtocolError("peer closed connection"))),
        streaming(Upstream(*hello("x"), DONE)),
    ])
    sid = await new_session(client, alice)
    r = await stream_chat(client, alice, sid, u("hi"))
    assert r.status_code == 200
    assert r.content == b"".join(events) + error_event("The upstream broke off the stream")
    listed = await stored(client, alice, sid)
    assert [(m["role"], m["content"], m["status"]) for m in listed] == [
        ("user", "hi", "complete"), ("assistant", "Partial", "incomplete")]
    # the incomplete reply stays in the history
    await stream_chat(client, alice, sid, u("go on"))
    assert sent(route)["messages"] == [
        u("hi"), {"role": "assistant", "content": "Partial"}, u("go on")]


@pytest.mark.parametrize(("failure", "expected"), [
    (httpx.ReadTimeout("slow"), error_event(
        "The upstream stopped sending before the reply was complete", "upstream_timeout")),
    (None, error_event("The upstream ended the stream before [DONE]")),
])
async def test_a_stalled_or_unfinished_stream_is_incomplete(
    client: Client, upstream: respx.Router, alice: User,
    failure: Exception | None, expected: bytes,
) -> None:
    events = hello("one", "two")
    parts: list[Any] = [*events] if failure is None else [*events, failure]
    upstream.post("/chat/completions").mock(return_value=streaming(Upstream(*parts)))
    sid = await new_session(client, alice)
    r = await stream_chat(client, alice, sid, u("hi"))
    assert r.content == b"".join(events) + expected
    listed = await stored(client, alice, sid)
    assert [(m["content"], m["status"]) for m in listed] == [
        ("hi", "complete"), ("onetwo", "incomplete")]


async def test_a_partial_tool_call_cut_off_mid_stream_does_not_break_later_turns(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    events = [
        event(chunk({"role": "assistant", "content": None})),
        event(chunk({"tool_calls": [{"index": 0, "id": "call_z", "type": "function",
                                     "function": {"name": "f", "arguments": '{"a": '}}]})),
    ]
    route = upstream.post("/chat/completions").mock(side_effect=[
        streaming(Upstream(*events, httpx.ReadError("reset"))),
        streaming(Upstream(*hello("ok"), DONE)),
    ])
    sid = await new_session(client, alice)
    await stream_chat(client, alice, sid, u("call f"))
    listed = await stored(client, alice, sid)
    assert listed[1]["status"] == "incomplete"
    assert listed[1]["tool_calls"] == [{"id": "call_z", "type": "function",
                                        "function": {"name": "f", "arguments": '{"a": '}}]
    r = await stream_chat(client, alice, sid, u("something else"))
    assert sent(route)["messages"] == [u("call f"), u("something else")]
    assert (r.headers["x-history-messages"], r.headers["x-history-dropped"]) == ("1", "1")


async def test_an_upstream_error_before_the_first_byte_stores_nothing(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    raw = b'{"error": {"message": "rate limited", "type": "requests", "code": "rate_limit"}}'
    upstream.post("/chat/completions").mock(side_effect=[
        httpx.Response(429, content=raw, headers={"content-type": "application/json",
                                                  "retry-after": "3"}),
        streaming(Upstream(httpx.ReadError("reset"))),
        streaming(Upstream(b'data: {"choi')),
    ])
    sid = await new_session(client, alice)
    r = await stream_chat(client, alice, sid, u("hi"))
    assert (r.status_code, r.content, r.headers["retry-after"]) == (429, raw, "3")
    r = await stream_chat(client, alice, sid, u("hi"))
    assert (r.status_code, r.content) == (
        200, error_event("The upstream broke off the stream"))
    r = await stream_chat(client, alice, sid, u("hi"))
    assert r.content == error_event("The upstream ended the stream before [DONE]")
    assert await stored(client, alice, sid) == []


async def test_a_stream_without_a_valid_chunk_stores_nothing(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    body = [b"data: not json\n\n", event({"object": "something else"}), b": hi\n\n", DONE]
    upstream.post("/chat/completions").mock(side_effect=[
        streaming(Upstream(*body)),
        httpx.Response(200, json={"object": "chat.completion", "choices": []}),
    ])
    sid = await new_session(client, alice)
    r = await stream_chat(client, alice, sid, u("hi"))
    assert r.content == b"".join(body)
    # the upstream ignored stream: true and answered with JSON: passed through, not stored
    r = await stream_chat(client, alice, sid, u("hi"))
    assert r.json() == {"object": "chat.completion", "choices": []}
    assert await stored(client, alice, sid) == []


async def test_a_done_without_its_blank_line_still_completes_the_turn(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    upstream.post("/chat/completions").mock(
        return_value=streaming(Upstream(*hello("ok"), b"data: [DONE]")))
    sid = await new_session(client, alice)
    r = await stream_chat(client, alice, sid, u("hi"))
    assert r.content == b"".join(hello("ok")) + DONE
    assert [m["status"] for m in await stored(client, alice, sid)] == ["complete", "complete"]


async def test_events_after_done_are_not_relayed(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    upstream.post("/chat/completions").mock(return_value=streaming(
        Upstream(*hello("ok"), DONE + event(chunk({"content": "late"})))))
    sid = await new_session(client, alice)
    r = await stream_chat(client, alice, sid, u("hi"))
    assert r.content == b"".join(hello("ok")) + DONE
    assert (await stored(client, alice, sid))[1]["content"] == "ok"


# --- the relay itself: what is stored when, however the stream ends ------------------------------


@pytest.fixture
async def rt(settings: Settings, database_url: str) -> AsyncIterator[Runtime]:
    """A Runtime on the test's own loop, for driving the relay generator directly."""
    async with runtime_on(settings, database_url, httpx.AsyncClient()) as runtime:
        yield runtime


async def as_sent(rt: Runtime, response: httpx.Response, turn: Turn) -> AsyncIterator[bytes]:
    """The relay's events as the client gets them (their bytes); closing it closes the relay."""
    async with aclosing(stream.relay(rt, response, turn)) as relayed:
        async for event in relayed:
            yield event.raw


def turn_of(sid: str) -> Turn:
    return Turn(sid, "gpt-4o", [NewMessage(u("hi"), 5)], {})


async def rows(db: asyncpg.Connection, sid: str) -> list[tuple[str, str, str]]:
    found = await db.fetch(
        "SELECT role, body, status FROM chat_messages WHERE session_id = $1 ORDER BY seq", sid)
    return [(r["role"], json.loads(r["body"]).get("content"), r["status"]) for r in found]


async def test_the_turn_is_stored_before_done_is_sent_and_each_event_goes_at_once(
    rt: Runtime, alice: User, db: asyncpg.Connection
) -> None:
    sid = await session_of(db, alice)
    events = hello("a", "b")
    gate = asyncio.Event()
    body = Upstream(events[0], gate, *events[1:], DONE)
    relay = as_sent(rt, streaming(body), turn_of(sid))
    # the first event arrives while the upstream is still holding back the rest (a relay that
    # buffered would wait for the gate forever)
    assert await asyncio.wait_for(anext(relay), 10) == events[0]
    gate.set()
    assert [await anext(relay) for _ in events[1:]] == events[1:]
    assert await rows(db, sid) == []
    assert await anext(relay) == DONE
    assert await rows(db, sid) == [("user", "hi", "complete"), ("assistant", "ab", "complete")]
    with pytest.raises(StopAsyncIteration):
        await anext(relay)
    assert body.closed


async def test_a_client_gone_after_done_does_not_store_the_turn_twice(
    rt: Runtime, alice: User, db: asyncpg.Connection
) -> None:
    sid = await session_of(db, alice)
    relay = as_sent(rt, streaming(Upstream(*hello("x"), DONE)), turn_of(sid))
    async for item in relay:
        if item == DONE:
            break
    await relay.aclose()
    await settle(rt)
    assert await rows(db, sid) == [("user", "hi", "complete"), ("assistant", "x", "complete")]


async def test_a_client_that_closes_mid_stream_stores_what_arrived_and_closes_the_upstream(
    rt: Runtime, alice: User, db: asyncpg.Connection
) -> None:
    sid = await session_of(db, alice)
    events = hello("par", "tial", "never")
    body = Upstream(*events[:3], asyncio.Event(), *events[3:], DONE)
    relay = as_sent(rt, streaming(body), turn_of(sid))
    assert [await anext(relay) for _ in range(3)] == events[:3]
    await relay.aclose()  # what the response does when the client went away
    await settle(rt)
    assert body.closed
    assert await rows(db, sid) == [
        ("user", "hi", "complete"), ("assistant", "partial", "incomplete")]


async def test_a_cancelled_request_task_still_stores_the_turn_once(
    rt: Runtime, alice: User, db: asyncpg.Connection
) -> None:
    """The request task is cancelled while waiting for the upstream's next chunk."""
    sid = await session_of(db, alice)
    events = hello("only")
    body = Upstream(*events[:2], asyncio.Event(), *events[2:], DONE)
    received: list[bytes] = []

    async def consume() -> None:
        async for item in as_sent(rt, streaming(body), turn_of(sid)):
            received.append(item)

    task = asyncio.create_task(consume())
    await body.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle(rt)
    assert received == events[:2]
    assert body.closed
    assert await rows(db, sid) == [("user", "hi", "complete"), ("assistant", "only", "incomplete")]


async def test_a_write_in_progress_survives_the_cancellation_of_the_request(
    rt: Runtime, alice: User, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = await session_of(db, alice)
    entered, release = asyncio.Event(), asyncio.Event()
    real = messages.store_turn

    async def slow_store(*args: Any, **kwargs: Any) -> int:
        entered.set()
        await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(messages, "store_turn", slow_store)

    async def consume() -> None:
        async for _ in as_sent(rt, streaming(Upstream(*hello("done"), DONE)), turn_of(sid)):
            pass

    task = asyncio.create_task(consume())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await settle(rt)
    assert await rows(db, sid) == [("user", "hi", "complete"), ("assistant", "done", "complete")]


async def test_a_stream_closed_before_any_valid_chunk_stores_nothing(
    rt: Runtime, alice: User, db: asyncpg.Connection
) -> None:
    sid = await session_of(db, alice)
    body = Upstream(b": comment\n\n", asyncio.Event())
    relay = as_sent(rt, streaming(body), turn_of(sid))
    assert await anext(relay) == b": comment\n\n"
    await relay.aclose()
    await settle(rt)
    assert body.closed
    assert await rows(db, sid) == []


# --- a turn is never stored twice ---------------------------------------------------------------


async def test_a_retry_after_a_write_of_unknown_outcome_does_not_store_twice(
    rt: Runtime, alice: User, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection died after the statement was sent: it may have committed, or not."""
    real = messages.store_turn
    ids: list[Any] = []

    def dying(commit_first: bool) -> Any:
        async def store(*args: Any, turn_id: Any, **more: Any) -> int:
            ids.append(turn_id)
            if len(ids) == 1:
                if commit_first:
                    await real(*args, turn_id=turn_id, **more)
                raise DatabaseUnavailable()
            return await real(*args, turn_id=turn_id, **more)
        return store

    for commit_first in (True, False):
        sid = await session_of(db, alice)
        ids.clear()
        monkeypatch.setattr(messages, "store_turn", dying(commit_first))
        await persist(rt, turn_of(sid), {"role": "assistant", "content": "x"}, None, "complete")
        assert len(ids) == 2 and ids[0] == ids[1]  # the retry carries the turn's own id
        assert await rows(db, sid) == [("user", "hi", "complete"), ("assistant", "x", "complete")]
        count = await db.fetchval("SELECT message_count FROM chat_sessions WHERE id = $1", sid)
        assert count == 2


async def test_a_turn_is_recognised_by_its_id_never_by_its_content(
    alice: User, db: asyncpg.Connection
) -> None:
    sid = await session_of(db, alice)
    turn = [NewMessage(u("hi"), 5), NewMessage({"role": "assistant", "content": "x"}, 4)]
    first, second = messages.new_turn_id(), messages.new_turn_id()
    assert first != second
    assert await messages.store_turn(db, sid, turn, turn_id=first) == 2
    assert await messages.store_turn(db, sid, turn, turn_id=second) == 2  # the same words again
    with pytest.raises(messages.StoredEarlier):
        await messages.store_turn(db, sid, turn, turn_id=first)
    found = await db.fetch(
        "SELECT seq FROM chat_messages WHERE session_id = $1 ORDER BY seq", sid)
    assert [r["seq"] for r in found] == [1, 2, 3, 4]
    session = await db.fetchrow(
        "SELECT message_count, total_tokens, next_seq FROM chat_sessions WHERE id = $1", sid)
    assert tuple(session) == (4, 18, 5)  # the refused retry changed nothing


@pytest.mark.parametrize(("cut", "closing"), [
    (b"", b""),  # after a whole event: the error event follows at once, no blank line
    (b"data: {\"id\": \"chatcmpl-s\", \"cho", b"\n\n"),  # mid-line: the line and event end
    (b": keep-alive\n", b"\n"),  # after a whole line: the blank line that ends its event
    (b": keep-alive\r\n", b"\r\n"),  # ... in the stream's own line ends
])
async def test_a_sessionless_stream_the_upstream_breaks_ends_with_an_error_event(
    client: Client, upstream: respx.Router, alice: User, cut: bytes, closing: bytes
) -> None:
    events = hello("cut")[:2]
    upstream.post("/chat/completions").mock(
        return_value=streaming(Upstream(*events, cut, httpx.ReadError("reset")))
    )
    r = await chat(client, alice, None, u("hi"), stream=True)
    assert r.status_code == 200
    assert r.content == b"".join(events) + cut + closing + error_event(
        "The upstream broke off the stream"
    )


async def test_a_session_stream_cut_mid_event_relays_whole_events_then_the_error_event(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    """A session's stream relays only whole events, so the error event follows the last one
    directly: no half event, no blank line before it."""
    events = hello("cut")[:2]
    upstream.post("/chat/completions").mock(return_value=streaming(
        Upstream(*events, b"data: {\"id\": \"chatcmpl-s\", \"cho", httpx.ReadError("reset"))))
    sid = await new_session(client, alice)
    r = await stream_chat(client, alice, sid, u("hi"))
    assert r.content == b"".join(events) + error_event("The upstream broke off the stream")
