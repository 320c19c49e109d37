"""The chat route answered ahead of Litestar (proxy/routes/fastpath.py) and the route Litestar
keeps answer alike: same bodies, headers and stored turns; errors in the same envelope."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
import respx

from proxy.errors import InternalError
from proxy.turns import prepare
from tests.conftest import User
from tests.turns import Client, answers, completion, new_session, sent, stored, u

DIRECT = "/v1/chat/completions"
THROUGH_LITESTAR = "/v1/chat/completions/"  # the trailing slash: Litestar's router answers it


async def test_both_routes_store_the_same_turn_and_send_the_same_answer(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=answers(completion("one"), completion("two")))
    sid = await new_session(client, alice)
    seen = []
    for path, text in ((DIRECT, "first"), (THROUGH_LITESTAR, "second")):
        r = await client.post(path, json={"model": "m", "messages": [u(text)], "session_id": sid},
                              headers=alice.headers)
        seen.append((r.status_code, r.headers["content-type"], r.headers["x-history-messages"],
                     r.json()["choices"][0]["message"]["content"]))
    assert seen == [(200, "application/json", "0", "one"), (200, "application/json", "2", "two")]
    assert [m["role"] for m in sent(route)["messages"]] == ["user", "assistant", "user"]
    assert [m["content"] for m in await stored(client, alice, sid)] == [
        "first", "one", "second", "two"]


async def test_an_error_has_the_same_envelope_on_both_routes(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    bodies = []
    for path in (DIRECT, THROUGH_LITESTAR):
        r = await client.post(path, json={"model": "m", "messages": []}, headers=alice.headers)
        bodies.append((r.status_code, r.headers["content-type"], r.json()))
    assert bodies[0] == bodies[1]
    assert bodies[0] == (400, "application/json", {"error": {
        "message": "messages must hold at least one message", "type": "invalid_request_error",
        "param": "messages", "code": "invalid_value"}})


async def test_an_unexpected_failure_is_a_500_that_tells_nothing_and_logs_the_request_id(
    client: Client, upstream: respx.Router, alice: User,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("sk-secret-in-the-traceback")

    monkeypatch.setattr(prepare, "prepare", broken)
    route = upstream.post("/chat/completions").mock(side_effect=answers(completion()))
    sid = await new_session(client, alice)
    with caplog.at_level(logging.ERROR, logger="chatproxy"):
        r = await client.post(DIRECT, json={"model": "m", "messages": [u("x")], "session_id": sid},
                              headers={**alice.headers, "X-Request-Id": "req-direct-1"})
    assert (r.status_code, r.json()) == (500, InternalError().body())
    assert r.json()["error"]["code"] == "internal_error"
    assert "sk-secret" not in r.text and r.headers["x-request-id"] == "req-direct-1"
    [record] = [rec for rec in caplog.records if rec.name == "chatproxy"]
    assert record.getMessage() == (
        "unhandled error on POST /v1/chat/completions (request id req-direct-1)")
    assert not route.called and await stored(client, alice, sid) == []


async def test_a_streamed_answer_on_the_direct_route_is_relayed_and_stored(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    events = [
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"he"}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"content":"llo"}}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, content=b"".join(events), headers={"content-type": "text/event-stream"}))
    sid = await new_session(client, alice)
    r = await client.post(DIRECT, json={"model": "m", "messages": [u("hi")], "session_id": sid,
                                        "stream": True}, headers=alice.headers)
    assert (r.status_code, r.headers["content-type"], r.headers["cache-control"]) == (
        200, "text/event-stream", "no-cache")
    assert r.content == b"".join(events)
    assert [(m["role"], m["content"]) for m in await stored(client, alice, sid)] == [
        ("user", "hi"), ("assistant", "hello")]


async def test_an_upstream_answer_without_a_body_passes_without_type_or_length(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    upstream.post("/chat/completions").mock(return_value=httpx.Response(204))
    r = await client.post(DIRECT, json={"model": "m", "messages": [u("hi")]},
                          headers=alice.headers)
    assert (r.status_code, r.content) == (204, b"")
    assert "content-type" not in r.headers and "content-length" not in r.headers
