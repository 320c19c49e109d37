"""Two `chatproxy serve` processes on one database.

50 concurrent turns on one session (issue 5, item 8): every turn stored once, seqs unique and
increasing, each reply right after its own request. A key both processes hold in their key
lease is refused by both as soon as its revocation through one of them has returned. Two turns
that resend the same stored messages at once (issue 16) store what they resend once.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from proxy.store import messages
from proxy.store.messages import NewMessage
from tests.conftest import ADMIN_KEY, UPSTREAM_KEY, User
from tests.fault_helpers import FakeUpstream, serve_env, serving
from tests.fault_helpers import chunk as fake_chunk
from tests.fault_helpers import completion as fake_completion
from tests.threaded import Threaded, read_body
from tests.turns import session_of

pytestmark = pytest.mark.e2e

TURNS = 50


async def test_concurrent_turns_over_two_processes_are_each_stored_once_in_order(
    database_url: str, alice: User, db: asyncpg.Connection, tmp_path: Path
) -> None:
    with FakeUpstream() as fake:
        env = serve_env(database_url, fake.base_url, tmp_path,
                        CHATPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY)
        with serving(env, tmp_path / "a.log") as a, serving(env, tmp_path / "b.log") as b:
            limits = httpx.Limits(max_connections=TURNS)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                r = await client.post(a.url + "/v1/chat/sessions", headers=alice.headers,
                                      json={"max_history_messages": 4})
                assert r.status_code == 201, r.text
                sid = r.json()["id"]

                async def turn(i: int) -> httpx.Response:
                    server = (a, b)[i % 2]
                    return await client.post(
                        server.url + "/v1/chat/completions", headers=alice.headers,
                        json={"model": "echo", "session_id": sid, "stream": i % 4 >= 2,
                              "messages": [{"role": "user", "content": f"turn {i}"}]})

                answers = await asyncio.gather(*(turn(i) for i in range(TURNS)))
        assert [r.status_code for r in answers] == [200] * TURNS, [r.text for r in answers]
        assert len(fake.requests) == TURNS

    rows = await db.fetch(
        "SELECT seq, role, body, status FROM chat_messages WHERE session_id = $1 ORDER BY seq",
        sid,
    )
    seqs = [r["seq"] for r in rows]
    assert seqs == list(range(1, 2 * TURNS + 1))  # unique, increasing, no gap
    contents = [(r["role"], json.loads(r["body"])["content"], r["status"]) for r in rows]
    questions = sorted(c for role, c, _ in contents if role == "user")
    assert questions == sorted(f"turn {i}" for i in range(TURNS))  # each stored once
    for request, reply in zip(contents[::2], contents[1::2], strict=True):
        assert request[0] == "user" and request[2] == "complete"
        assert reply == ("assistant", f"reply to {request[1]}", "complete")
    session = await db.fetchrow(
        "SELECT message_count, next_seq FROM chat_sessions WHERE id = $1", sid)
    assert (session["message_count"], session["next_seq"]) == (2 * TURNS, 2 * TURNS + 1)


async def test_a_key_revoked_through_one_process_is_refused_by_both_at_once(
    database_url: str, alice: User, tmp_path: Path
) -> None:
    """Both processes answer the key from their lease (proxy/keylease.py) before the revocation."""
    with FakeUpstream() as fake:
        env = serve_env(database_url, fake.base_url, tmp_path, CHATPROXY_ADMIN_KEY=ADMIN_KEY)
        with serving(env, tmp_path / "a.log") as a, serving(env, tmp_path / "b.log") as b:
            async with httpx.AsyncClient(timeout=30) as client:

                async def sessions(url: str) -> int:
                    r = await client.get(url + "/v1/chat/sessions", headers=alice.headers)
                    return r.status_code

                for _ in range(10):  # a lease is trusted once its first beat is back
                    assert [await sessions(a.url), await sessions(b.url)] == [200, 200]
                    await asyncio.sleep(0.05)
                revoked = await client.delete(
                    f"{a.url}/admin/keys/{alice.key_id}",
                    headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                assert revoked.status_code == 204
                assert [await sessions(b.url), await sessions(a.url)] == [401, 401]


class Together:
    """An upstream that answers nothing until `count` chat requests have arrived, then answers
    each with a completion (or a stream): the turns behind them have all read the session by
    then."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.bodies: list[dict[str, Any]] = []
        self.all_in = threading.Event()
        self._threaded = Threaded(self.app, log_level="critical", loop="asyncio")
        self.base_url = f"http://127.0.0.1:{self._threaded.port}/v1"

    def __enter__(self) -> Together:
        self._threaded.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.all_in.set()
        self._threaded.stop()

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = json.loads(await read_body(receive))
        self.bodies.append(body)
        if len(self.bodies) >= self.count:
            self.all_in.set()
        await asyncio.to_thread(self.all_in.wait, 30)
        text = f"reply {len(self.bodies)}"
        streamed = body.get("stream") is True
        answer = (fake_chunk(text) + b"data: [DONE]\n\n" if streamed
                  else json.dumps(fake_completion(text)).encode())
        kind = b"text/event-stream" if streamed else b"application/json"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": answer})


async def test_two_turns_racing_over_two_processes_store_a_resent_run_once(
    database_url: str, alice: User, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """An agent's tool-loop call sent twice at once (a retry without Idempotency-Key), through
    two processes: both read the session before either writes, both recognise the same resent
    [user, call]; the tool result is stored once, each reply after it."""
    call = {"id": "call_9", "type": "function",
            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}
    question = {"role": "user", "content": "weather in Oslo?"}
    calls = {"role": "assistant", "content": None, "tool_calls": [call]}
    result = {"role": "tool", "tool_call_id": "call_9", "content": "snow"}
    sid = await session_of(db, alice)
    await messages.store_turn(db, sid, [NewMessage(question, 9), NewMessage(calls, 9)])
    with Together(2) as upstream:
        env = serve_env(database_url, upstream.base_url, tmp_path,
                        CHATPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY)
        with serving(env, tmp_path / "a.log") as a, serving(env, tmp_path / "b.log") as b:
            async with httpx.AsyncClient(timeout=60) as client:
                answers = await asyncio.gather(*(
                    client.post(server.url + "/v1/chat/completions", headers=alice.headers,
                                json={"model": "echo", "session_id": sid, "stream": streamed,
                                      "messages": [question, calls, result]})
                    for server, streamed in ((a, False), (b, True))))
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert [r.headers.get("x-history-overlap") for r in answers] == ["2", "2"]
    assert [len(body["messages"]) for body in upstream.bodies] == [3, 3]  # each message once
    rows = await db.fetch(
        "SELECT seq, role, body FROM chat_messages WHERE session_id = $1 ORDER BY seq", sid)
    assert [(r["seq"], r["role"]) for r in rows] == [
        (1, "user"), (2, "assistant"), (3, "tool"), (4, "assistant"), (5, "assistant")]
    assert json.loads(rows[2]["body"]) == result
    session = await db.fetchrow(
        "SELECT message_count, next_seq FROM chat_sessions WHERE id = $1", sid)
    assert (session["message_count"], session["next_seq"]) == (5, 6)
