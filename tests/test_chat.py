"""`POST /v1/chat/completions`: exactly what the upstream receives, and what is stored.

The upstream is respx; each test asserts the whole JSON body the upstream received, so injected
history, head rules and forwarded fields are proven together (contract §6, §7).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import respx

from proxy.config import Settings
from proxy.tokens import ModelTable, TokenCounter
from tests.conftest import ROOT, UPSTREAM_KEY, User, configured
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
    stored,
    u,
)


def fitting(tokens: list[int], budget: int) -> tuple[int, int]:
    """How many of the newest single-message units fit `budget`, and their tokens."""
    count = total = 0
    for cost in reversed(tokens):
        if total + cost > budget:
            break
        count, total = count + 1, total + cost
    return count, total


async def talk(client: Client, user: User, sid: str, turns: int) -> None:
    for i in range(1, turns + 1):
        r = await chat(client, user, sid, u(f"u{i}"))
        assert r.status_code == 200, r.text


# --- the upstream body --------------------------------------------------------------------------


async def test_history_is_injected_in_order_between_head_and_rest(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=answers(completion("r1"), completion("r2"), completion("r3")))
    sid = await new_session(client, alice, system_prompt="be brief")
    await talk(client, alice, sid, 2)
    r = await chat(client, alice, sid, u("third"), {"role": "user", "content": "and more"})
    assert r.status_code == 200
    assert sent(route) == {"model": "gpt-4o", "messages": [
        {"role": "system", "content": "be brief"},
        u("u1"), a("r1"), u("u2"), a("r2"),
        u("third"), u("and more"),
    ]}
    assert history_headers(r)[1:] == ("4", r.headers["x-history-tokens"], "0")
    assert [(m["role"], m["content"]) for m in await stored(client, alice, sid)] == [
        ("user", "u1"), ("assistant", "r1"), ("user", "u2"), ("assistant", "r2"),
        ("user", "third"), ("user", "and more"), ("assistant", "r3"),
    ]


async def test_the_requests_own_system_and_developer_messages_replace_the_session_prompt(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=answers(completion("r1"), completion("r2"), completion("r3")))
    sid = await new_session(client, alice, system_prompt="session prompt")
    await talk(client, alice, sid, 1)
    opening = [{"role": "system", "content": "mine"}, {"role": "developer", "content": "dev"}]
    await chat(client, alice, sid, *opening, u("q"))
    assert sent(route)["messages"] == [*opening, u("u1"), a("r1"), u("q")]
    # A system message later in the request is not a head: the session prompt still opens it.
    late = {"role": "system", "content": "late"}
    await chat(client, alice, sid, u("q2"), late)
    assert sent(route)["messages"] == [
        {"role": "system", "content": "session prompt"},
        u("u1"), a("r1"), u("q"), a("r2"), u("q2"), late,
    ]
    # System and developer messages are never stored.
    assert [m["content"] for m in await stored(client, alice, sid)] == [
        "u1", "r1", "q", "r2", "q2", "r3"]


async def test_no_system_prompt_means_no_head(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(completion()))
    sid = await new_session(client, alice)
    await chat(client, alice, sid, u("hi"))
    assert sent(route)["messages"] == [u("hi")]


async def test_unknown_fields_are_forwarded_unchanged_and_proxy_fields_removed(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(completion()))
    sid = await new_session(client, alice)
    extra = {
        "temperature": 0.25, "n": 1, "seed": 7, "user": "end-user-1",
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "metadata": {"k": "v"}, "x_vendor_thing": {"nested": [1, 2.5, None, True, "é\u0000"]},
        "max_history_messages": 5,
    }
    message = {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "bob"}
    r = await chat(client, alice, sid, message, **extra)
    assert r.status_code == 200, r.text
    expected = {"model": "gpt-4o", "messages": [message], **extra}
    del expected["max_history_messages"]
    assert sent(route) == expected
    assert (await stored(client, alice, sid))[0]["content"] == message["content"]
    assert (await stored(client, alice, sid))[0]["name"] == "bob"


async def test_the_upstream_answer_reaches_the_client_byte_for_byte_with_history_headers(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    raw = b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":' \
          b'{"role":"assistant","content":"caf\\u00e9"}}],  "zz": 1.50}'
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, content=raw, headers={"content-type": "application/json", "x-upstream": "1"}))
    sid = await new_session(client, alice)
    r = await chat(client, alice, sid, u("hi"))
    assert r.content == raw
    assert r.headers["x-upstream"] == "1"
    assert history_headers(r) == (sid, "0", "0", "0")
    assert (await stored(client, alice, sid))[1]["content"] == "café"


async def test_the_upstream_key_is_sent_and_never_the_clients(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(completion()))
    sid = await new_session(client, alice)
    await client.post("/v1/chat/completions", json={"model": "m", "messages": [u("x")]},
                      headers={**alice.headers, "X-Session-Id": sid, "Cookie": "c=1"})
    headers = route.calls[0].request.headers
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert all(alice.key not in value for value in headers.values())
    assert "x-session-id" not in headers and "cookie" not in headers


# --- which session ------------------------------------------------------------------------------


async def test_the_session_may_come_in_the_x_session_id_header(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=answers(completion("r1"), completion("r2"), completion("r3")))
    sid = await new_session(client, alice)
    await talk(client, alice, sid, 1)
    r = await client.post("/v1/chat/completions", json={"model": "m", "messages": [u("x")]},
                          headers={**alice.headers, "X-Session-Id": sid})
    assert r.status_code == 200
    assert r.headers["x-session-id"] == sid
    assert sent(route) == {"model": "m", "messages": [u("u1"), a("r1"), u("x")]}
    # Both, the same: fine.
    r = await client.post("/v1/chat/completions",
                          json={"model": "m", "session_id": sid, "messages": [u("y")]},
                          headers={**alice.headers, "X-Session-Id": sid})
    assert r.status_code == 200


async def test_a_body_session_id_and_a_different_header_are_refused(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(completion()))
    sid = await new_session(client, alice)
    other = await new_session(client, alice)
    r = await client.post("/v1/chat/completions",
                          json={"model": "m", "session_id": sid, "messages": [u("x")]},
                          headers={**alice.headers, "X-Session-Id": other})
    assert r.status_code == 400
    assert r.json() == {"error": {
        "message": "session_id in the body and the X-Session-Id header differ",
        "type": "invalid_request_error", "param": "session_id", "code": "invalid_value"}}
    assert route.call_count == 0


@pytest.mark.parametrize("how", ["foreign", "unknown", "deleted"])
async def test_a_session_that_is_not_the_callers_is_404_and_the_upstream_gets_nothing(
    client: Client, upstream: respx.Router, alice: User, bob: User, how: str
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(completion()))
    sid = await new_session(client, bob)
    caller = alice
    if how == "unknown":
        sid = "sess_doesnotexist0000000000"
    elif how == "deleted":
        caller = bob
        assert (await client.delete(f"/v1/chat/sessions/{sid}", headers=bob.headers)
                ).status_code == 204
    for headers in ({}, {"X-Session-Id": sid}):
        body = {"model": "m", "messages": [u("x")], **({} if headers else {"session_id": sid})}
        r = await client.post("/v1/chat/completions", json=body,
                              headers={**caller.headers, **headers})
        assert r.status_code == 404
        assert r.json() == {"error": {
            "message": f"Session {sid} not found", "type": "invalid_request_error",
            "param": "session_id", "code": "session_not_found"}}
    assert route.call_count == 0


async def test_a_bad_key_is_401_before_anything_else(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(completion()))
    sid = await new_session(client, alice)
    r = await client.post("/v1/chat/completions",
                          json={"model": "m", "session_id": sid, "messages": [u("x")]},
                          headers={"Authorization": "Bearer sk-cp-unknownkey000000000000000000"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert route.call_count == 0


# --- how much history ---------------------------------------------------------------------------


async def test_max_history_messages_per_request_overrides_the_sessions(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=answers(*(completion(f"r{i}") for i in range(1, 7))))
    sid = await new_session(client, alice, max_history_messages=3)
    await talk(client, alice, sid, 2)
    r = await chat(client, alice, sid, u("q"))  # the session's own 3: the newest 3
    assert sent(route)["messages"] == [a("r1"), u("u2"), a("r2"), u("q")]
    assert r.headers["x-history-messages"] == "3"
    r = await chat(client, alice, sid, u("q2"), max_history_messages=2)
    assert sent(route) == {"model": "gpt-4o", "messages": [u("q"), a("r3"), u("q2")]}
    r = await chat(client, alice, sid, u("q3"), max_history_messages=0)
    assert sent(route) == {"model": "gpt-4o", "messages": [u("q3")]}
    assert history_headers(r) == (sid, "0", "0", "0")
    r = await chat(client, alice, sid, u("q4"), max_history_messages=1000)
    assert len(sent(route)["messages"]) == 11


@pytest.mark.parametrize("value", [-1, 1001, "3", True, 2.5])
async def test_a_bad_max_history_messages_is_400(
    client: Client, upstream: respx.Router, alice: User, value: Any
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(completion()))
    sid = await new_session(client, alice)
    r = await chat(client, alice, sid, u("x"), max_history_messages=value)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_history_messages"
    assert route.call_count == 0


def tiny_models(tmp_path: Path) -> str:
    path = tmp_path / "models.toml"
    path.write_text(
        '[defaults]\ncontext_window = 128000\nreserve_output_tokens = 4096\n'
        'encoding = "o200k_base"\n\n'
        '[models."tiny"]\ncontext_window = 1000\nreserve_output_tokens = 100\n'
        'encoding = "o200k_base"\n'
    )
    return str(path)


async def test_the_token_budget_drops_the_oldest_units(
    settings: Settings, upstream: respx.Router, alice: User, tmp_path: Path
) -> None:
    """Budget = context_window - (max_completion_tokens | max_tokens | reserve) - request."""
    models = tiny_models(tmp_path)
    route = upstream.post("/chat/completions").mock(side_effect=[
        httpx.Response(200, json=completion(f"r{i}", usage={"completion_tokens": 197}))
        for i in range(1, 10)
    ])
    counter = TokenCounter(ModelTable.load(models))
    async with proxy_with(configured(settings, models_file=models), upstream) as client:
        sid = await new_session(client, alice)
        for i in range(1, 4):
            assert (await chat(client, alice, sid, u(f"u{i}"), model="tiny")).status_code == 200
        tokens = [m["tokens"] for m in await stored(client, alice, sid)]
        assert tokens[1::2] == [200, 200, 200]  # usage.completion_tokens + 3
        request = u("next")
        own = counter.message("tiny", request) + 3  # the request, and the reply's priming
        newest_two = tokens[-2] + tokens[-1]  # u3 + r3

        # max_tokens leaves exactly room for the newest two messages
        r = await chat(client, alice, sid, request, model="tiny",
                       max_tokens=1000 - own - newest_two)
        assert sent(route)["messages"] == [u("u3"), a("r3"), request]
        assert history_headers(r) == (sid, "2", str(newest_two), "4")
        # one token short of the newest two: only the newest fits, nothing older past it
        tokens = [m["tokens"] for m in await stored(client, alice, sid)]  # ... next, r4
        r = await chat(client, alice, sid, request, model="tiny",
                       max_tokens=1000 - own - (tokens[-1] + tokens[-2] - 1))
        assert sent(route)["messages"] == [a("r4"), request]
        assert history_headers(r)[1:] == ("1", "200", "7")
        # max_completion_tokens wins over max_tokens
        r = await chat(client, alice, sid, request, model="tiny", max_tokens=0,
                       max_completion_tokens=1000 - own)
        assert sent(route)["messages"] == [request]
        assert history_headers(r)[1:] == ("0", "0", "10")
        # neither: reserve_output_tokens (100) is kept free
        tokens = [m["tokens"] for m in await stored(client, alice, sid)]
        r = await chat(client, alice, sid, request, model="tiny")
        fit, total = fitting(tokens, 1000 - 100 - own)
        assert fit == 8  # four replies of 200 tokens and their questions; a fifth would not fit
        assert history_headers(r)[1:] == (str(fit), str(total), str(len(tokens) - fit))


async def test_max_history_tokens_of_the_session_caps_the_history(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=[
        httpx.Response(200, json=completion(f"r{i}", usage={"completion_tokens": 7}))
        for i in range(1, 5)
    ])
    sid = await new_session(client, alice)
    await talk(client, alice, sid, 2)
    tokens = [m["tokens"] for m in await stored(client, alice, sid)]
    r = await client.patch(f"/v1/chat/sessions/{sid}", headers=alice.headers,
                           json={"max_history_tokens": tokens[-1] + tokens[-2]})
    assert r.status_code == 200, r.text
    r = await chat(client, alice, sid, u("q"))
    assert sent(route)["messages"] == [u("u2"), a("r2"), u("q")]
    assert history_headers(r)[1:] == ("2", str(tokens[-1] + tokens[-2]), "2")


# --- tool exchanges -----------------------------------------------------------------------------

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
CALLS = {"role": "assistant", "content": None, "tool_calls": [CALL]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}


async def test_a_full_tool_round_trip_keeps_the_exchange_together(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(
        completion(None, tool_calls=[CALL]), completion("It is sunny."), completion("bye")))
    sid = await new_session(client, alice)
    r = await chat(client, alice, sid, u("weather in Paris?"), tools=[{"type": "function"}])
    assert r.json()["choices"][0]["message"]["tool_calls"] == [CALL]
    r = await chat(client, alice, sid, RESULT)
    assert sent(route)["messages"] == [u("weather in Paris?"), CALLS, RESULT]
    assert r.headers["x-history-messages"] == "2"
    await chat(client, alice, sid, u("thanks"))
    assert sent(route)["messages"] == [
        u("weather in Paris?"), CALLS, RESULT, a("It is sunny."), u("thanks")]
    listed = await stored(client, alice, sid)
    assert [m["role"] for m in listed] == ["user", "assistant", "tool", "assistant", "user",
                                           "assistant"]
    assert listed[1]["tool_calls"] == [CALL] and listed[1]["content"] is None
    assert listed[2]["tool_call_id"] == "call_1"


async def test_a_tool_exchange_is_dropped_whole_for_the_budget(
    settings: Settings, upstream: respx.Router, alice: User, tmp_path: Path
) -> None:
    models = tiny_models(tmp_path)
    route = upstream.post("/chat/completions").mock(side_effect=answers(
        completion(None, tool_calls=[CALL]), completion("sunny!"), completion("x"),
        completion("y")))
    async with proxy_with(configured(settings, models_file=models), upstream) as client:
        sid = await new_session(client, alice)
        await chat(client, alice, sid, u("weather?"), model="tiny")
        await chat(client, alice, sid, RESULT, model="tiny")
        tokens = [m["tokens"] for m in await stored(client, alice, sid)]  # u, calls, tool, a
        own = TokenCounter(ModelTable.load(models)).message("tiny", u("q")) + 3
        # room for the answer and the whole exchange
        room = tokens[3] + tokens[2] + tokens[1]
        r = await chat(client, alice, sid, u("q"), model="tiny", max_tokens=1000 - own - room)
        assert sent(route)["messages"] == [CALLS, RESULT, a("sunny!"), u("q")]
        assert history_headers(r)[1:] == ("3", str(room), "1")
        # one token less: the exchange goes whole, the tool result is not kept alone
        tokens = [m["tokens"] for m in await stored(client, alice, sid)]  # ..., q, x
        room = tokens[5] + tokens[4] + tokens[3] + tokens[2] + tokens[1] - 1
        r = await chat(client, alice, sid, u("q"), model="tiny", max_tokens=1000 - own - room)
        assert sent(route)["messages"] == [a("sunny!"), u("q"), a("x"), u("q")]
        assert history_headers(r)[1:] == ("3", str(room - tokens[2] - tokens[1] + 1), "3")


async def test_history_never_starts_with_a_tool_message(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(
        completion(None, tool_calls=[CALL]), completion("sunny!"), completion("x"),
        completion("y")))
    sid = await new_session(client, alice)
    await chat(client, alice, sid, u("weather?"))
    await chat(client, alice, sid, RESULT)
    # the newest two stored messages are the tool result and the answer: the result is cut
    r = await chat(client, alice, sid, u("q"), max_history_messages=2)
    assert sent(route)["messages"] == [a("sunny!"), u("q")]
    assert history_headers(r)[1:3] == ("1", r.headers["x-history-tokens"])
    assert r.headers["x-history-dropped"] == "1"
    await chat(client, alice, sid, u("q"), max_history_messages=5)
    assert sent(route)["messages"] == [CALLS, RESULT, a("sunny!"), u("q"), a("x"), u("q")]


async def test_tool_calls_the_client_never_answered_are_left_out_of_later_history(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    """Injected, they would make the upstream refuse this turn and every later one."""
    route = upstream.post("/chat/completions").mock(side_effect=answers(
        completion(None, tool_calls=[CALL]), completion("fine"), completion("x")))
    sid = await new_session(client, alice)
    await chat(client, alice, sid, u("weather?"))
    r = await chat(client, alice, sid, u("never mind"))
    assert sent(route)["messages"] == [u("weather?"), u("never mind")]
    assert history_headers(r)[1:3] == ("1", r.headers["x-history-tokens"])
    assert r.headers["x-history-dropped"] == "1"
    await chat(client, alice, sid, u("again"))
    assert sent(route)["messages"] == [u("weather?"), u("never mind"), a("fine"), u("again")]
    # the unanswered call is still stored, as it came
    assert (await stored(client, alice, sid))[1]["tool_calls"] == [CALL]


# --- what is stored -----------------------------------------------------------------------------


async def test_the_turn_moves_the_session_counters(
    client: Client, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    upstream.post("/chat/completions").mock(side_effect=answers(
        completion("r1", usage={"completion_tokens": 40}), completion("r2", usage=None)))
    sid = await new_session(client, alice)
    before = await db.fetchrow("SELECT created_at, updated_at FROM chat_sessions WHERE id = $1",
                               sid)
    await chat(client, alice, sid, {"role": "system", "content": "not stored"}, u("u1"))
    session = (await client.get(f"/v1/chat/sessions/{sid}", headers=alice.headers)).json()
    listed = await stored(client, alice, sid)
    assert [m["seq"] for m in listed] == [1, 2]
    assert listed[1]["tokens"] == 43  # usage.completion_tokens + the message overhead
    assert session["message_count"] == 2
    assert session["total_tokens"] == listed[0]["tokens"] + 43
    assert session["last_message_at"] is not None
    after = await db.fetchrow(
        "SELECT updated_at, last_message_at FROM chat_sessions WHERE id = $1", sid)
    assert after["updated_at"] > before["updated_at"]
    assert after["last_message_at"] > before["created_at"]

    await chat(client, alice, sid, u("u2"))  # no usage: the reply is counted
    listed = await stored(client, alice, sid)
    counter = TokenCounter(ModelTable.load(str(ROOT / "config" / "models.toml")))
    assert listed[3]["tokens"] == counter.message("gpt-4o", a("r2"))
    session = (await client.get(f"/v1/chat/sessions/{sid}", headers=alice.headers)).json()
    assert session["message_count"] == 4
    assert session["total_tokens"] == sum(m["tokens"] for m in listed)


async def test_reasoning_tokens_are_not_counted_as_history(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    usage = {"completion_tokens": 500, "completion_tokens_details": {"reasoning_tokens": 480}}
    upstream.post("/chat/completions").mock(side_effect=answers(completion("r", usage=usage)))
    sid = await new_session(client, alice)
    await chat(client, alice, sid, u("x"), model="o3")
    assert (await stored(client, alice, sid))[1]["tokens"] == 23


async def test_the_reply_is_stored_exactly_as_sent(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(
        completion(None, refusal="I can't help with that.", annotations=[{"x": 1}],
                   reasoning_content="hmm"),
        completion("ok")))
    sid = await new_session(client, alice)
    await chat(client, alice, sid, u("bad"))
    listed = await stored(client, alice, sid)
    assert listed[1] == {"seq": 2, "role": "assistant", "content": None,
                         "refusal": "I can't help with that.", "tokens": listed[1]["tokens"],
                         "status": "complete"}
    await chat(client, alice, sid, u("next"))
    assert sent(route)["messages"][1] == {
        "role": "assistant", "content": None, "refusal": "I can't help with that."}


async def test_a_200_that_is_not_a_chat_completion_stores_nothing(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    upstream.post("/chat/completions").mock(side_effect=[
        httpx.Response(200, json={"object": "list", "data": []}),
        httpx.Response(200, json={"choices": []}),
        httpx.Response(200, content=b"<html>oops</html>"),
    ])
    sid = await new_session(client, alice)
    r = await chat(client, alice, sid, u("x"))
    assert (r.status_code, r.json()) == (200, {"object": "list", "data": []})
    r = await chat(client, alice, sid, u("x"))
    assert (r.status_code, r.json()) == (200, {"choices": []})
    r = await chat(client, alice, sid, u("x"))
    assert r.status_code == 502
    assert r.json() == {"error": {
        "message": "The upstream answered with a body that is not JSON", "type": "server_error",
        "param": None, "code": "upstream_error"}}
    assert await stored(client, alice, sid) == []


# --- upstream failures --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
async def test_upstream_http_errors_pass_through_and_store_nothing(
    client: Client, upstream: respx.Router, alice: User, status: int
) -> None:
    raw = b'{"error": {"message": "nope", "type": "x", "param": null, "code": "y"}}'
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        status, content=raw, headers={"content-type": "application/json", "retry-after": "7"}))
    sid = await new_session(client, alice)
    r = await chat(client, alice, sid, u("x"))
    assert (r.status_code, r.content) == (status, raw)
    assert r.headers["retry-after"] == "7"
    assert r.headers["content-type"] == "application/json"
    assert await stored(client, alice, sid) == []
    session = (await client.get(f"/v1/chat/sessions/{sid}", headers=alice.headers)).json()
    assert (session["message_count"], session["total_tokens"]) == (0, 0)


@pytest.mark.parametrize(("failure", "status", "code", "message"), [
    (httpx.ConnectError("refused"), 502, "upstream_error", "The upstream could not be reached"),
    (httpx.ConnectTimeout("slow"), 502, "upstream_error", "The upstream could not be reached"),
    (httpx.ReadTimeout("slow"), 504, "upstream_timeout", "The upstream did not answer in time"),
])
async def test_an_unreachable_or_slow_upstream_is_an_envelope_and_stores_nothing(
    client: Client, upstream: respx.Router, alice: User,
    failure: Exception, status: int, code: str, message: str,
) -> None:
    upstream.post("/chat/completions").mock(side_effect=failure)
    sid = await new_session(client, alice)
    for stream in (False, True):
        r = await chat(client, alice, sid, u("x"), stream=stream)
        assert r.status_code == status
        assert r.json() == {"error": {"message": message, "type": "server_error",
                                      "param": None, "code": code}}
    assert await stored(client, alice, sid) == []
    # the same without a session
    r = await chat(client, alice, None, u("x"))
    assert (r.status_code, r.json()["error"]["code"]) == (status, code)


# --- without a session: a transparent proxy ------------------------------------------------------


async def test_without_a_session_the_body_goes_upstream_byte_for_byte(
    client: Client, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    answer = b'{"id":"c","object":"chat.completion","choices":[]}'
    route = upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, content=answer, headers={"content-type": "application/json"}))
    count = await db.fetchval("SELECT count(*) FROM chat_messages")
    raw = (b'{ "messages" : [{"role":"user","content":"caf\\u00e9 \\ud83d\\ude00"}],'
           b'"model":"gpt-4o",  "temperature": 1.0, "zz": [1e3] }')
    r = await client.post("/v1/chat/completions", content=raw,
                          headers={**alice.headers, "content-type": "application/json"})
    assert (r.status_code, r.content) == (200, answer)
    assert route.calls[0].request.content == raw
    assert route.calls[0].request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "x-session-id" not in r.headers and "x-history-messages" not in r.headers
    # a per-request max_history_messages is the proxy's own field: removed, the rest unchanged
    await chat(client, alice, None, u("x"), max_history_messages=3, top_p=0.5)
    assert sent(route) == {"model": "gpt-4o", "messages": [u("x")], "top_p": 0.5}
    assert await db.fetchval("SELECT count(*) FROM chat_messages") == count


async def test_without_a_session_a_bad_key_is_401(
    client: Client, upstream: respx.Router
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(completion()))
    r = await client.post("/v1/chat/completions", json={"model": "m", "messages": [u("x")]},
                          headers={"Authorization": "Bearer sk-cp-nope0000000000000000000000"})
    assert r.status_code == 401
    assert route.call_count == 0


# --- other /v1 routes ---------------------------------------------------------------------------


async def test_models_and_other_v1_routes_pass_through_with_the_upstream_key(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    models = {"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]}
    listing = upstream.get("/models").mock(return_value=httpx.Response(200, json=models))
    embeddings = upstream.post("/embeddings").mock(return_value=httpx.Response(
        200, json={"object": "list", "data": []}, headers={"x-request-cost": "3"}))
    upstream.get("/files").mock(return_value=httpx.Response(
        429, json={"error": {"message": "slow down"}}, headers={"retry-after": "2"}))

    r = await client.get("/v1/models", headers=alice.headers)
    assert (r.status_code, r.json()) == (200, models)
    assert listing.calls[0].request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"

    raw = b'{"model": "text-embedding-3-small", "input": ["a", "b"]}'
    r = await client.post("/v1/embeddings?x=1", content=raw,
                          headers={**alice.headers, "content-type": "application/json"})
    assert (r.status_code, r.json()) == (200, {"object": "list", "data": []})
    assert r.headers["x-request-cost"] == "3"
    request = embeddings.calls[0].request
    assert (request.content, request.url.query) == (raw, b"x=1")
    assert request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"

    r = await client.get("/v1/files", headers=alice.headers)
    assert (r.status_code, r.headers["retry-after"]) == (429, "2")
    assert r.json() == {"error": {"message": "slow down"}}

    r = await client.get("/v1/models")
    assert r.status_code == 401
    assert listing.call_count == 1
