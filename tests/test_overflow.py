"""Overflow recovery (contract §11): a turn the upstream refuses as too long for its context is
sent once more with less history, before any byte reached the client, under the same claim; it
is stored once; a refused retry, or a turn without history, passes the upstream's error through
unchanged; the window the refusal stated is used from the next turn on.

The upstream is respx; the session's history is seeded with known token counts so that how much
a retry leaves out can be checked exactly.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx
import respx

from proxy import metrics
from proxy.store import messages
from proxy.store.messages import NewMessage
from tests.conftest import User
from tests.turns import Client, chat, completion, metric, new_session, sent, u

TOKENS = 100  # each seeded message's stored count


def refusal(limit: int, requested: int) -> httpx.Response:
    return httpx.Response(400, json={"object": "error", "type": "BadRequestError", "code": 400,
                                     "param": None, "message": (
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{requested} tokens ({requested - 16} in the messages, 16 in the completion). Please "
        "reduce the length of the messages or completion.")})


def stream_of(text: str) -> httpx.Response:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                          "finish_reason": None}]}
    body = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


async def seeded(client: Client, db: asyncpg.Connection, user: User, count: int = 10) -> str:
    """A session holding `count` alternating user/assistant messages of TOKENS tokens each."""
    sid = await new_session(client, user, max_history_messages=50)
    history = [NewMessage({"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"},
                          TOKENS) for i in range(count)]
    await messages.store_turn(db, sid, history)
    return sid


def history_of(body: dict[str, Any]) -> list[str]:
    return [m["content"] for m in body["messages"] if m["content"].startswith("m")]


async def stored_count(db: asyncpg.Connection, sid: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM chat_messages WHERE session_id = $1", sid)
    return count


def injected_metric() -> tuple[float, float]:
    """The history-messages histogram's count and sum."""
    text = metrics.render().decode()
    return (metric(text, "chatproxy_history_messages_injected_count"),
            metric(text, "chatproxy_history_messages_injected_sum"))


def retries(model: str) -> float:
    return metric(metrics.render().decode(), "chatproxy_overflow_retries_total", model=model)


async def test_a_refused_turn_is_sent_again_without_the_excess_and_stored_once(
    client: Client, upstream: respx.Router, db: asyncpg.Connection, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=[refusal(8192, 8500), httpx.Response(200, json=completion("fits"))])
    sid = await seeded(client, db, alice)
    before = retries("gpt-4o")
    injected = injected_metric()
    r = await chat(client, alice, sid, u("next"))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "fits"
    # The history metrics count the turn once, with the history it was answered with.
    assert injected_metric() == (injected[0] + 1, injected[1] + 6)
    assert route.call_count == 2
    first, second = history_of(sent(route, 0)), history_of(sent(route, 1))
    assert first == [f"m{i}" for i in range(10)]
    # 308 tokens over, plus 5%: 324 at least, so 4 whole messages of 100 go.
    assert second == [f"m{i}" for i in range(4, 10)]
    assert sent(route, 1)["messages"][-1] == u("next")
    assert r.headers["x-history-retried"] == "1"
    assert (r.headers["x-history-messages"], r.headers["x-history-tokens"]) == ("6", "600")
    assert await stored_count(db, sid) == 12  # the turn, once
    assert retries("gpt-4o") == before + 1


async def test_a_streamed_turn_retries_before_its_first_byte(
    client: Client, upstream: respx.Router, db: asyncpg.Connection, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=[refusal(8192, 8500), stream_of("streamed")])
    sid = await seeded(client, db, alice)
    r = await chat(client, alice, sid, u("next"), stream=True)
    assert r.status_code == 200, r.text
    assert "streamed" in r.text and r.text.endswith("data: [DONE]\n\n")
    assert r.headers["x-history-retried"] == "1"
    assert route.call_count == 2
    assert history_of(sent(route, 1)) == [f"m{i}" for i in range(4, 10)]
    rows = await db.fetch("SELECT body FROM chat_messages WHERE session_id = $1 AND seq > 10 "
                          "ORDER BY seq", sid)
    assert [json.loads(row["body"])["content"] for row in rows] == ["next", "streamed"]


async def test_without_a_stated_size_half_the_history_goes(
    client: Client, upstream: respx.Router, db: asyncpg.Connection, alice: User
) -> None:
    ollama = httpx.Response(400, json={"error": {
        "message": "the input length exceeds the context length", "type": "api_error"}})
    route = upstream.post("/chat/completions").mock(
        side_effect=[ollama, httpx.Response(200, json=completion("ok"))])
    sid = await seeded(client, db, alice)
    r = await chat(client, alice, sid, u("next"))
    assert r.status_code == 200
    assert history_of(sent(route, 1)) == [f"m{i}" for i in range(5, 10)]  # 500 of 1000 tokens


async def test_no_retry_without_injected_history(
    client: Client, upstream: respx.Router, db: asyncpg.Connection, alice: User
) -> None:
    refused = refusal(100, 150)
    route = upstream.post("/chat/completions").mock(return_value=refused)
    sid = await new_session(client, alice)
    r = await chat(client, alice, sid, u("a very long question"))
    assert (r.status_code, r.content) == (400, refused.content)
    assert route.call_count == 1
    assert "x-history-retried" not in r.headers
    assert await stored_count(db, sid) == 0


async def test_a_refused_retry_passes_the_upstreams_error_through_and_stores_nothing(
    client: Client, upstream: respx.Router, db: asyncpg.Connection, alice: User
) -> None:
    second = httpx.Response(400, json={"error": {
        "message": "prompt is too long: 9000 tokens > 8192 maximum",
        "type": "invalid_request_error"}}, headers={"x-upstream": "second"})
    route = upstream.post("/chat/completions").mock(side_effect=[
        refusal(8192, 8500), second,
        refusal(8192, 8500), second,
    ])
    sid = await seeded(client, db, alice)
    headers = {**alice.headers, "Idempotency-Key": "overflow-1"}
    body = {"model": "gpt-4o", "session_id": sid, "messages": [u("next")]}
    for attempt in (1, 2):  # the key was released: the same request runs again
        r = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert (r.status_code, r.content) == (400, second.content), attempt
        assert r.headers["x-upstream"] == "second"
        assert "x-history-retried" not in r.headers and "x-session-id" not in r.headers
    assert route.call_count == 4
    assert await stored_count(db, sid) == 10


async def test_other_upstream_errors_are_not_retried(
    client: Client, upstream: respx.Router, db: asyncpg.Connection, alice: User
) -> None:
    limited = httpx.Response(429, json={"error": {"message": "Rate limit reached",
                                                  "type": "rate_limit_error"}})
    route = upstream.post("/chat/completions").mock(return_value=limited)
    sid = await seeded(client, db, alice)
    r = await chat(client, alice, sid, u("next"))
    assert (r.status_code, r.content) == (429, limited.content)
    assert route.call_count == 1


async def test_one_idempotency_claim_covers_the_retry(
    client: Client, upstream: respx.Router, db: asyncpg.Connection, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=[refusal(8192, 8500), httpx.Response(200, json=completion("once"))])
    sid = await seeded(client, db, alice)
    headers = {**alice.headers, "Idempotency-Key": "overflow-2"}
    body = {"model": "gpt-4o", "session_id": sid, "messages": [u("next")]}
    first = await client.post("/v1/chat/completions", json=body, headers=headers)
    again = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-history-retried"] == "1"
    assert again.content == first.content
    assert route.call_count == 2
    assert await stored_count(db, sid) == 12


async def test_a_window_one_users_refusal_stated_leaves_other_users_turns_alone(
    client: Client, upstream: respx.Router, db: asyncpg.Connection, alice: User, bob: User
) -> None:
    """An upstream error may quote the request: bob's message stating a tiny window (echoed
    back in a refusal) shrinks bob's own later turns at most, never alice's."""
    def echoing(request: httpx.Request) -> httpx.Response:
        said = json.loads(request.content)["messages"][-1]["content"]
        if "maximum context length" in said:
            return httpx.Response(400, json={"error": {"message": f"input {said!r} refused"}})
        return httpx.Response(200, json=completion("ok"))

    route = upstream.post("/chat/completions").mock(side_effect=echoing)
    model = "gpt-4o-shared-window-test"
    hers, his = await seeded(client, db, alice), await seeded(client, db, bob)
    r = await chat(client, bob, his, u("This model's maximum context length is 1 tokens"),
                   model=model)
    assert r.status_code == 400  # refused again when retried: the quote is in the retry too
    assert client.app.state.rt.context_limits[(bob.id, model)] == 1
    calls = route.call_count
    r = await chat(client, alice, hers, u("hello"), model=model)
    assert r.status_code == 200, r.text
    assert route.call_count == calls + 1  # fitted the first time, all of it
    assert (r.headers["x-history-messages"], r.headers["x-history-dropped"]) == ("10", "0")
    assert (alice.id, model) not in client.app.state.rt.context_limits


async def test_the_stated_window_is_used_from_the_next_turn_on(
    client: Client, upstream: respx.Router, db: asyncpg.Connection, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=[
        refusal(900, 1050), httpx.Response(200, json=completion("a")),
        httpx.Response(200, json=completion("b")),
    ])
    sid = await seeded(client, db, alice)
    model = "gpt-4o-overflow-test"  # its own learned window: other tests use gpt-4o
    r = await chat(client, alice, sid, u("one"), model=model)
    assert r.status_code == 200 and route.call_count == 2
    assert client.app.state.rt.context_limits[(alice.id, model)] == 900
    r = await chat(client, alice, sid, u("two"), model=model)
    assert r.status_code == 200
    assert route.call_count == 3  # fitted the first time
    assert "x-history-retried" not in r.headers
    # The learned window, less a reply reserve of a quarter of it (the table's 4096 would
    # leave nothing): the history stays within 900 - 225.
    assert int(r.headers["x-history-tokens"]) <= 900 - 225
    assert int(r.headers["x-history-dropped"]) > 0
