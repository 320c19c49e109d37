"""Two `chatproxy serve` processes on one database.

50 concurrent turns on one session (issue 5, item 8): every turn stored once, seqs unique and
increasing, each reply right after its own request. And a key both processes hold in their key
lease is refused by both as soon as its revocation through one of them has returned.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import ADMIN_KEY, UPSTREAM_KEY, User
from tests.fault_helpers import FakeUpstream, serve_env, serving

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
