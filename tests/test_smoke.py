"""A first turn through the whole stack: session, history injection, write-back."""

from __future__ import annotations

import json

import httpx
import respx

from tests.conftest import UPSTREAM_KEY
from tests.turns import completion


async def test_two_turns_inject_history(client, upstream: respx.Router, alice) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=[httpx.Response(200, json=completion("one")),
                     httpx.Response(200, json=completion("two"))]
    )
    r = await client.post("/v1/chat/sessions", json={"system_prompt": "be brief"},
                          headers=alice.headers)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r1 = await client.post("/v1/chat/completions", headers=alice.headers, json={
        "model": "gpt-4o", "session_id": sid, "messages": [{"role": "user", "content": "hi"}]})
    assert r1.status_code == 200, r1.text
    assert r1.json()["choices"][0]["message"]["content"] == "one"
    r2 = await client.post("/v1/chat/completions", headers=alice.headers, json={
        "model": "gpt-4o", "session_id": sid, "temperature": 0.5,
        "messages": [{"role": "user", "content": "again"}]})
    assert r2.status_code == 200
    assert r2.headers["x-history-messages"] == "2"
    sent = json.loads(route.calls[1].request.content)
    assert sent == {
        "model": "gpt-4o", "temperature": 0.5,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "again"},
        ],
    }
    assert route.calls[1].request.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    msgs = await client.get(f"/v1/chat/sessions/{sid}/messages", headers=alice.headers)
    assert [m["content"] for m in msgs.json()["data"]] == ["hi", "one", "again", "two"]


async def test_streamed_turn_is_stored(client, upstream: respx.Router, alice) -> None:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo\u0000\ud800"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    body += b"data: [DONE]\n\n"
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, content=body, headers={"content-type": "text/event-stream"}))
    sid = (await client.post("/v1/chat/sessions", json={}, headers=alice.headers)).json()["id"]
    r = await client.post("/v1/chat/completions", headers=alice.headers, json={
        "model": "gpt-4o", "session_id": sid, "stream": True,
        "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    assert r.content == body
    msgs = (await client.get(f"/v1/chat/sessions/{sid}/messages",
                             headers=alice.headers)).json()["data"]
    assert msgs[1]["content"] == "Hello\u0000\ud800"
    assert msgs[1]["status"] == "complete"
