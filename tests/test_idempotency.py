"""Idempotency-Key on /v1/chat/completions: replay, 409 in flight, 422 on a new body, expiry."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx
import respx

from proxy import db as proxy_db
from proxy.store.idempotency import STALE_MINUTES, Answer
from proxy.turns import claim as idempotency
from tests.conftest import User
from tests.turns import Client, completion, new_session, stored, u

SSE = {"content-type": "text/event-stream"}


def body(sid: str, text: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "session_id": sid, "messages": [u(text)], **fields}


def with_key(user: User, key: str) -> dict[str, str]:
    return {**user.headers, "Idempotency-Key": key}


async def test_a_retry_replays_the_response_without_a_second_turn(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("once"))
    )
    sid = await new_session(client, alice)
    first = await client.post("/v1/chat/completions", json=body(sid),
                              headers=with_key(alice, "k-1"))
    again = await client.post("/v1/chat/completions", json=body(sid),
                              headers=with_key(alice, "k-1"))
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    for name in ("x-session-id", "x-history-messages", "x-history-tokens", "x-history-dropped",
                 "x-history-stored"):
        assert again.headers[name] == first.headers[name]
    assert route.call_count == 1
    assert [m["content"] for m in await stored(client, alice, sid)] == ["hi", "once"]


async def test_a_streamed_retry_is_replayed_as_the_same_stream(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "str"}}]},
        {"choices": [{"index": 0, "delta": {"content": "eam"}, "finish_reason": "stop"}]},
    ]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    stream += b"data: [DONE]\n\n"
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, content=stream, headers=SSE)
    )
    sid = await new_session(client, alice)
    first = await client.post("/v1/chat/completions", json=body(sid, stream=True),
                              headers=with_key(alice, "s-1"))
    again = await client.post("/v1/chat/completions", json=body(sid, stream=True),
                              headers=with_key(alice, "s-1"))
    assert first.content == again.content == stream
    assert again.headers["content-type"].startswith("text/event-stream")
    assert route.call_count == 1
    assert [m["content"] for m in await stored(client, alice, sid)] == ["hi", "stream"]


async def test_the_same_key_with_another_body_is_422(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("x"))
    )
    sid = await new_session(client, alice)
    await client.post("/v1/chat/completions", json=body(sid), headers=with_key(alice, "k-2"))
    r = await client.post("/v1/chat/completions", json=body(sid, "other"),
                          headers=with_key(alice, "k-2"))
    assert r.status_code == 422
    assert r.json() == {"error": {
        "message": "This Idempotency-Key was used with a different request",
        "type": "invalid_request_error", "param": "Idempotency-Key",
        "code": "idempotency_key_reused"}}
    assert route.call_count == 1


async def test_a_retry_while_the_first_runs_is_409(
    client: Client, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("late"))
    )
    sid = await new_session(client, alice)
    request = body(sid)
    # The first request holds the key (here: as another proxy process would, mid-request).
    fingerprint = idempotency.request_hash(sid, json.dumps(request).encode())
    claimed = await idempotency.claim(db, idempotency.Claim(alice.id, "k-3"), fingerprint)
    assert isinstance(claimed, idempotency.Claim)
    r = await client.post("/v1/chat/completions", content=json.dumps(request),
                          headers={**with_key(alice, "k-3"), "content-type": "application/json"})
    assert r.status_code == 409
    assert r.json() == {"error": {
        "message": "A request with this Idempotency-Key is still in progress",
        "type": "invalid_request_error", "param": "Idempotency-Key",
        "code": "idempotency_key_in_use"}}
    assert route.call_count == 0
    # A claim left running past its staleness limit (its request died) can be taken over.
    await db.execute(
        "UPDATE idempotency_keys SET created_at = now() - make_interval(mins => $2) "
        "WHERE user_id = $1 AND key = 'k-3'", alice.id, STALE_MINUTES + 1)
    r = await client.post("/v1/chat/completions", content=json.dumps(request),
                          headers={**with_key(alice, "k-3"), "content-type": "application/json"})
    assert r.status_code == 200
    assert route.call_count == 1
    # The request that lost its claim, late, can neither settle nor release the new one's.
    await proxy_db._init_connection(db)  # the pool's jsonb codec
    async with db.transaction():
        await claimed.settle(db, Answer(200, {}, b"stale"))
        await claimed.settle(db, None)
    r = await client.post("/v1/chat/completions", content=json.dumps(request),
                          headers={**with_key(alice, "k-3"), "content-type": "application/json"})
    assert (r.status_code, r.headers["idempotent-replayed"]) == (200, "true")
    assert r.json() == completion("late")


async def test_keys_are_scoped_to_the_caller(
    client: Client, upstream: respx.Router, alice: User, bob: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=[httpx.Response(200, json=completion("a")),
                     httpx.Response(200, json=completion("b"))]
    )
    alice_sid = await new_session(client, alice)
    bob_sid = await new_session(client, bob)
    ra = await client.post("/v1/chat/completions", json=body(alice_sid),
                           headers=with_key(alice, "shared"))
    rb = await client.post("/v1/chat/completions", json=body(bob_sid),
                           headers=with_key(bob, "shared"))
    assert ra.json()["choices"][0]["message"]["content"] == "a"
    assert rb.json()["choices"][0]["message"]["content"] == "b"
    assert route.call_count == 2


async def test_an_upstream_error_releases_the_key(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=[httpx.Response(429, json={"error": {"message": "slow down"}}),
                     httpx.ConnectError("down"),
                     httpx.Response(200, json=completion("finally"))]
    )
    sid = await new_session(client, alice)
    statuses = []
    for _ in range(3):
        r = await client.post("/v1/chat/completions", json=body(sid),
                              headers=with_key(alice, "k-4"))
        statuses.append(r.status_code)
    assert statuses == [429, 502, 200]
    assert route.call_count == 3
    assert [m["content"] for m in await stored(client, alice, sid)] == ["hi", "finally"]


async def test_an_expired_key_runs_again(
    client: Client, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=[httpx.Response(200, json=completion("old")),
                     httpx.Response(200, json=completion("new"))]
    )
    sid = await new_session(client, alice)
    await client.post("/v1/chat/completions", json=body(sid), headers=with_key(alice, "k-5"))
    await db.execute(
        "UPDATE idempotency_keys SET created_at = now() - interval '24 hours 1 second' "
        "WHERE user_id = $1 AND key = 'k-5'", alice.id)
    r = await client.post("/v1/chat/completions", json=body(sid), headers=with_key(alice, "k-5"))
    assert r.json()["choices"][0]["message"]["content"] == "new"
    assert "idempotent-replayed" not in r.headers
    assert route.call_count == 2


async def test_a_malformed_key_is_400_before_anything_runs(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("x"))
    )
    sid = await new_session(client, alice)
    r = await client.post("/v1/chat/completions", json=body(sid),
                          headers=with_key(alice, "x" * 256))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "Idempotency-Key"
    assert route.call_count == 0
    assert await stored(client, alice, sid) == []
