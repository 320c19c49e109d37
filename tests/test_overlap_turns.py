"""Clients that keep their own history (contract §6): a turn recognises what the request resends
of the session's newest messages, stores it once and sends it upstream once.

Through the app with a respx upstream, and `store_turn` driven directly for the race between two
turns that recognised the same overlap.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import codec
from proxy.config import Settings
from proxy.runtime import Runtime
from proxy.store import messages
from proxy.store.messages import NewMessage, TurnContext, stored
from proxy.tokens import ModelTable, TokenCounter
from proxy.turns import prepare
from tests.conftest import User, configured
from tests.strict_upstream import conversation_problem
from tests.test_chat import tiny_models
from tests.test_streaming import SSE, Upstream, chunk, event
from tests.turns import (
    Client,
    a,
    answers,
    chat,
    completion,
    history_headers,
    new_session,
    proxy_with,
    sent,
    session_of,
    u,
)
from tests.turns import stored as listed_messages

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
CALLS = {"role": "assistant", "content": None, "tool_calls": [CALL]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}


def overlap_headers(r: httpx.Response) -> tuple[str | None, str, str, str]:
    """(X-History-Overlap, -Messages, -Dropped, -Stored)."""
    return (r.headers.get("x-history-overlap"), r.headers["x-history-messages"],
            r.headers["x-history-dropped"], r.headers["x-history-stored"])


def kinds(listed: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content") if m["content"] is not None else m.get("tool_calls"))
            for m in listed]


async def test_a_tool_loops_second_call_is_stored_once_and_its_exchange_becomes_whole(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(
        completion(None, tool_calls=[CALL]), completion("It is sunny."), completion("bye")))
    sid = await new_session(client, alice)
    first = await chat(client, alice, sid, u("weather in Paris?"), tools=[{"type": "function"}])
    assert overlap_headers(first) == (None, "0", "0", "0")
    # The agent's loop resends the question and the call as the SDK returned it (refusal: null).
    call = first.json()["choices"][0]["message"]
    r = await chat(client, alice, sid, u("weather in Paris?"), call, RESULT)
    assert sent(route)["messages"] == [u("weather in Paris?"), call, RESULT]  # each once
    assert overlap_headers(r) == ("2", "0", "0", "2")
    listed = await listed_messages(client, alice, sid)
    assert kinds(listed) == [("user", "weather in Paris?"), ("assistant", [CALL]),
                             ("tool", "sunny"), ("assistant", "It is sunny.")]
    # The stored call is answered by the stored result: injected whole from now on.
    r = await chat(client, alice, sid, u("thanks"))
    assert sent(route)["messages"] == [
        u("weather in Paris?"), CALLS, RESULT, a("It is sunny."), u("thanks")]
    assert overlap_headers(r) == (None, "4", "0", "4")


async def test_a_client_that_resends_gets_the_upstream_body_of_one_that_does_not(
    settings: Settings, upstream: respx.Router, alice: User, tmp_path: Path
) -> None:
    """The window (4) counts the resent messages, the trimming applies before them, and they
    count as the request's own for the budget: the upstream sees the same request either way,
    and the same messages are dropped."""
    route = upstream.post("/chat/completions").mock(
        side_effect=lambda request: httpx.Response(200, json=completion(
            "reply to " + json.loads(request.content)["messages"][-1]["content"][:10])))
    question = [u(f"question {i} " + "word " * 40) for i in range(3)]
    tiny = configured(settings, models_file=tiny_models(tmp_path))
    async with proxy_with(tiny, upstream) as client:
        sids = [await new_session(client, alice, max_history_messages=4) for _ in range(2)]
        resends = ([], [question[2], a("reply to question 2")])
        bodies, headers = [], []
        for sid, resent in zip(sids, resends, strict=True):
            for max_tokens in (600, 900):  # room for the whole window, then for part of it
                await client.delete(f"/v1/chat/sessions/{sid}/messages", headers=alice.headers)
                for q in question:
                    await chat(client, alice, sid, q, model="tiny")
                r = await chat(client, alice, sid, *resent, u("new"), model="tiny",
                               max_tokens=max_tokens)
                bodies.append(sent(route)["messages"])
                headers.append((r.headers.get("x-history-overlap"), *history_headers(r)[1:]))
    assert bodies[0] == bodies[2] and bodies[1] == bodies[3]
    assert bodies[0] == [question[1], a("reply to question 1"), question[2],
                         a("reply to question 2"), u("new")]
    assert bodies[1] == bodies[0][1:]  # the tighter budget left the oldest question out
    assert [h[0] for h in headers] == [None, None, "2", "2"]
    for i, dropped in enumerate(("0", "1")):
        alone, resending = headers[i], headers[i + 2]
        assert alone[3] == resending[3] == dropped
        assert int(alone[1]) == int(resending[1]) + 2  # X-History-Messages: the resent 2 apart


async def test_a_chat_app_resending_everything_past_the_window_stores_no_duplicate(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    upstream.post("/chat/completions").mock(
        side_effect=lambda request: httpx.Response(200, json=completion(
            "echo " + json.loads(request.content)["messages"][-1]["content"])))
    route = upstream.routes[0]
    sid = await new_session(client, alice, max_history_messages=2, system_prompt="Be brief.")
    conversation: list[dict[str, Any]] = [{"role": "system", "content": "Be terse."}]
    for i in range(5):
        conversation.append(u(f"q{i}"))
        r = await chat(client, alice, sid, *conversation)
        assert sent(route)["messages"] == conversation  # nothing injected twice, nothing lost
        assert overlap_headers(r) == (str(2 * i) if i else None, "0", "0", str(2 * i))
        conversation.append(r.json()["choices"][0]["message"])
    listed = await listed_messages(client, alice, sid)
    assert [m["content"] for m in listed] == [
        text for i in range(5) for text in (f"q{i}", f"echo q{i}")]


async def test_a_resend_that_differs_anywhere_is_new_messages(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=answers(completion("one"), completion("two")))
    sid = await new_session(client, alice)
    await chat(client, alice, sid, u("hi"))
    r = await chat(client, alice, sid, u("hi"), a("one, edited"), u("next"))
    assert "x-history-overlap" not in r.headers
    assert sent(route)["messages"] == [u("hi"), a("one"), u("hi"), a("one, edited"), u("next")]
    assert [m["content"] for m in await listed_messages(client, alice, sid)] == [
        "hi", "one", "hi", "one, edited", "next", "two"]


async def test_a_streamed_turn_recognises_the_overlap(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=[
        httpx.Response(200, json=completion(None, tool_calls=[CALL])),
        httpx.Response(200, headers=SSE, stream=Upstream(
            event(chunk({"role": "assistant", "content": "Sun"})), event(chunk({"content": "ny"})),
            event(chunk(finish="stop")), b"data: [DONE]\n\n")),
    ])
    sid = await new_session(client, alice)
    await chat(client, alice, sid, u("weather?"))
    r = await chat(client, alice, sid, u("weather?"), CALLS, RESULT, stream=True)
    assert r.content.endswith(b"data: [DONE]\n\n")
    assert overlap_headers(r) == ("2", "0", "0", "2")
    assert sent(route)["messages"] == [u("weather?"), CALLS, RESULT]
    assert kinds(await listed_messages(client, alice, sid)) == [
        ("user", "weather?"), ("assistant", [CALL]), ("tool", "sunny"), ("assistant", "Sunny")]


async def test_an_idempotent_retry_of_a_resending_turn_replays_it_unchanged(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=answers(completion(None, tool_calls=[CALL]), completion("It is sunny.")))
    sid = await new_session(client, alice)
    await chat(client, alice, sid, u("weather?"))
    body = {"model": "gpt-4o", "session_id": sid, "messages": [u("weather?"), CALLS, RESULT]}
    headers = {**alice.headers, "Idempotency-Key": "loop-2"}
    first = await client.post("/v1/chat/completions", json=body, headers=headers)
    again = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
    assert overlap_headers(again) == overlap_headers(first) == ("2", "0", "0", "2")
    assert route.call_count == 2
    assert len(await listed_messages(client, alice, sid)) == 4


async def test_x_history_stored_is_what_the_session_held_before_the_turn(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    """With a window of 3, the model sees 3 of the 10 held: the headers say so."""
    upstream.post("/chat/completions").mock(return_value=httpx.Response(200, json=completion()))
    sid = await new_session(client, alice, max_history_messages=3)
    for i in range(5):
        await chat(client, alice, sid, u(f"q{i}"))
    r = await chat(client, alice, sid, u("q5"))
    assert overlap_headers(r) == (None, "3", "0", "10")
    r = await chat(client, alice, sid, a("ok"), u("q6"))  # resends the newest reply
    assert overlap_headers(r) == ("1", "2", "0", "12")


# --- two turns that recognised the same overlap (store_turn's check of next_seq) --------------


def new(*items: dict[str, Any]) -> list[NewMessage]:
    return [NewMessage(m, 5) for m in items]


async def contents(db: asyncpg.Connection, sid: str) -> list[tuple[int, str, Any]]:
    rows = await db.fetch("SELECT seq, role, body FROM chat_messages WHERE session_id = $1 "
                          "ORDER BY seq", sid)
    return [(r["seq"], r["role"], json.loads(r["body"]).get("content")) for r in rows]


async def test_the_second_of_two_racing_turns_does_not_store_what_the_first_did(
    alice: User, db: asyncpg.Connection
) -> None:
    sid = await session_of(db, alice)
    assert await messages.store_turn(db, sid, new(u("weather?"), CALLS)) == 2
    read = await db.fetchval("SELECT next_seq FROM chat_sessions WHERE id = $1", sid)
    # Both turns read next_seq 3 and recognised [user, call]; the first stores as usual...
    assert await messages.store_turn(db, sid, new(RESULT, a("sunny!")), after_seq=read) == 2
    # ...the second finds the seq moved, and the tool result already there.
    assert await messages.store_turn(db, sid, new(RESULT, a("Sunny.")), after_seq=read) == 1
    assert await contents(db, sid) == [
        (1, "user", "weather?"), (2, "assistant", None), (3, "tool", "sunny"),
        (4, "assistant", "sunny!"), (5, "assistant", "Sunny.")]
    count = await db.fetchval("SELECT message_count FROM chat_sessions WHERE id = $1", sid)
    assert count == 5


async def test_racing_turns_with_different_messages_are_both_stored_whole(
    alice: User, db: asyncpg.Connection
) -> None:
    sid = await session_of(db, alice)
    await messages.store_turn(db, sid, new(u("hi"), a("hello")))
    assert await messages.store_turn(db, sid, new(u("tab one"), a("1")), after_seq=3) == 2
    assert await messages.store_turn(db, sid, new(u("tab two"), a("2")), after_seq=3) == 2
    assert [c for _, _, c in await contents(db, sid)] == [
        "hi", "hello", "tab one", "1", "tab two", "2"]


async def test_an_in_doubt_retry_of_a_resending_turn_stores_it_once(
    alice: User, db: asyncpg.Connection
) -> None:
    sid = await session_of(db, alice)
    await messages.store_turn(db, sid, new(u("weather?"), CALLS))
    turn, turn_id = new(RESULT, a("sunny!")), messages.new_turn_id()
    # Committed, then its answer lost: the retry, with the turn's id, stores nothing again.
    assert await messages.store_turn(db, sid, turn, after_seq=3, turn_id=turn_id) == 2
    with pytest.raises(messages.StoredEarlier):
        await messages.store_turn(db, sid, turn, after_seq=3, turn_id=turn_id)
    assert len(await contents(db, sid)) == 4
    other = await session_of(db, alice)  # the first attempt never committed: stored by the retry
    await messages.store_turn(db, other, new(u("weather?"), CALLS))
    assert await messages.store_turn(
        db, other, turn, after_seq=3, turn_id=messages.new_turn_id()) == 2
    assert len(await contents(db, other)) == 4


# --- properties of a prepared turn ------------------------------------------------------------


@st.composite
def conversations(draw: st.DrawFn) -> list[tuple[dict[str, Any], int]]:
    """A well-formed stored history (every call answered), each message with its stored tokens
    and text of its own (a conversation never repeats a message)."""
    messages: list[dict[str, Any]] = []
    for unit in range(draw(st.integers(min_value=0, max_value=10))):
        kind = draw(st.sampled_from(["user", "reply", "tools"]))
        if kind == "user":
            messages.append(u(f"question {unit}"))
        elif kind == "reply":
            messages.append(a(f"answer {unit}"))
        else:
            ids = [f"call_{unit}_{i}" for i in range(draw(st.integers(1, 3)))]
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}}
                for i in ids]})
            messages += [{"role": "tool", "tool_call_id": i, "content": f"result {i}"}
                         for i in ids]
    return [(m, draw(st.integers(min_value=3, max_value=80))) for m in messages]


def context(history: list[tuple[dict[str, Any], int]], window: int, resent: int
            ) -> TurnContext:
    """What the turn's read returns: the window, and the older messages it fetched to compare."""
    rows = [stored(seq, m["role"], bool(m.get("tool_calls")), tokens, codec.dumps_text(m))
            for seq, (m, tokens) in enumerate(history, 1)]
    fetched = rows[max(0, len(rows) - max(window, resent)):]
    edge = max(0, len(fetched) - window)
    return TurnContext("user_1", True, None, window, None, fetched[edge:], fetched[:edge],
                       len(rows), len(rows) + 1)


def prepared(rt: Runtime, ctx: TurnContext, messages: list[dict[str, Any]], max_tokens: int
             ) -> tuple[list[Any], dict[str, str], list[Any]]:
    body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens}
    turn, body = asyncio.run(prepare.prepare(rt, body, messages, ctx, "sess_x"))
    upstream = json.loads(codec.dumps(body["messages"]))
    return upstream, turn.headers, [n.message for n in turn.new]


@pytest.fixture(scope="module")
def tiny_rt(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    models = tiny_models(tmp_path_factory.mktemp("models"))
    return Runtime(Settings(), None, None, TokenCounter(ModelTable.load(models)))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=conversations(), window=st.integers(min_value=0, max_value=30),
       max_tokens=st.integers(min_value=600, max_value=990), data=st.data())
def test_resending_any_suffix_sends_each_message_once_and_as_a_new_only_client_would(
    tiny_rt: Runtime, history: list[tuple[dict[str, Any], int]], window: int,
    max_tokens: int, data: st.DataObject,
) -> None:
    """Whatever suffix of the history a client resends (even from inside a tool exchange whose
    call is in the window): the upstream gets a valid conversation with each message once, and
    nothing resent is stored. When the resent messages are whole units within the window and a
    client sending only the new message would have had them all injected, the upstream gets
    exactly that client's request, and the same messages are dropped."""
    cut = data.draw(st.integers(min_value=0, max_value=len(history)))
    resent = [m for m, _ in history[cut:]]
    new = [u("the new question")]
    ctx = context(history, window, len(resent) + 1)
    upstream, headers, stored_new = prepared(tiny_rt, ctx, [*resent, *new], max_tokens)
    opener = cut  # the message that opens the exchange the resent messages start in
    while opener < len(history) and history[opener][0]["role"] == "tool":
        opener -= 1
    if opener == cut or opener >= len(history) - window:  # else the request opens with
        assert conversation_problem(upstream) is None, upstream  # answers to a call left out
    assert headers.get("x-history-overlap") == (str(len(resent)) if resent else None)
    assert stored_new == new
    alone, alone_headers, _ = prepared(tiny_rt, context(history, window, 1), list(new),
                                       max_tokens)
    whole_units = not resent or resent[0]["role"] != "tool"
    kept = alone[len(alone) - 1 - len(resent):len(alone) - 1] == resent
    if whole_units and len(resent) <= window and kept:
        assert upstream == alone
        assert headers["x-history-dropped"] == alone_headers["x-history-dropped"]
        assert int(headers["x-history-messages"]) + len(resent) == int(
            alone_headers["x-history-messages"])
