"""Idempotency-Key on `POST /v1/responses`: a retry gets the same response (a stream as a
stream) without a second upstream call or a second stored turn, across processes too."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import respx

from tests.conftest import UPSTREAM_KEY, User
from tests.fault_helpers import FakeUpstream, serve_env, serving
from tests.turns import Client, completion

SSE = {"content-type": "text/event-stream"}


def keyed(user: User, key: str) -> dict[str, str]:
    return {**user.headers, "Idempotency-Key": key}


def events(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(block.split("\n")[1].removeprefix("data: "))
            for block in body.decode().split("\n\n") if block]


async def test_a_retry_gets_the_same_response_and_nothing_runs_twice(
    client: Client, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("once")))
    conversation = (await client.post("/v1/conversations", headers=alice.headers,
                                      json={})).json()["id"]
    body = {"model": "gpt-4o", "input": "hi", "conversation": conversation}
    first = await client.post("/v1/responses", json=body, headers=keyed(alice, "r-1"))
    again = await client.post("/v1/responses", json=body, headers=keyed(alice, "r-1"))
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["content-type"] == "application/json"
    assert route.call_count == 1
    assert await db.fetchval("SELECT count(*) FROM chat_messages WHERE session_id = $1",
                             conversation) == 2
    stored = await client.get(f"/v1/responses/{first.json()['id']}", headers=alice.headers)
    assert stored.json() == first.json()

    other = await client.post("/v1/responses", json={**body, "input": "other"},
                              headers=keyed(alice, "r-1"))
    assert (other.status_code, other.json()["error"]["code"]) == (422, "idempotency_key_reused")


async def test_a_streamed_retry_is_replayed_as_a_stream_of_the_same_response(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "str"}}]},
              {"choices": [{"index": 0, "delta": {"content": "eam"}, "finish_reason": "stop"}]}]
    stream = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    route = upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, content=stream + b"data: [DONE]\n\n", headers=SSE))
    body = {"model": "gpt-4o", "input": "hi", "stream": True}
    first = await client.post("/v1/responses", json=body, headers=keyed(alice, "s-1"))
    again = await client.post("/v1/responses", json=body, headers=keyed(alice, "s-1"))
    assert route.call_count == 1
    assert again.headers["content-type"].startswith("text/event-stream")
    lived, replayed = events(first.content), events(again.content)
    assert lived[-1]["type"] == replayed[-1]["type"] == "response.completed"
    assert lived[-1]["response"] == replayed[-1]["response"]
    assert [e["sequence_number"] for e in replayed] == list(range(len(replayed)))
    assert "".join(e["delta"] for e in lived if e["type"] == "response.output_text.delta") == (
        "stream")


@pytest.mark.e2e
async def test_concurrent_retries_over_two_processes_run_once(
    database_url: str, alice: User, db: asyncpg.Connection, tmp_path: Path
) -> None:
    with FakeUpstream() as fake:
        env = serve_env(database_url, fake.base_url, tmp_path,
                        CHATPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY)
        with serving(env, tmp_path / "a.log") as a, serving(env, tmp_path / "b.log") as b:
            async with httpx.AsyncClient(timeout=60) as client:
                made = await client.post(a.url + "/v1/conversations", headers=alice.headers,
                                         json={})
                conversation = made.json()["id"]
                body = {"model": "echo", "input": "only once", "conversation": conversation}

                async def attempt(i: int) -> httpx.Response:
                    return await client.post((a, b)[i % 2].url + "/v1/responses", json=body,
                                             headers=keyed(alice, "many"))

                answers = await asyncio.gather(*(attempt(i) for i in range(20)))
                retry = await attempt(0)
        assert len(fake.requests) == 1
    assert {r.status_code for r in answers} <= {200, 409}
    done = [r.json() for r in [*answers, retry] if r.status_code == 200]
    assert retry.status_code == 200 and all(d == done[0] for d in done)
    assert await db.fetchval("SELECT count(*) FROM responses WHERE session_id = $1",
                             conversation) == 1
    rows = await db.fetch("SELECT role FROM chat_messages WHERE session_id = $1 ORDER BY seq",
                          conversation)
    assert [r["role"] for r in rows] == ["user", "assistant"]
