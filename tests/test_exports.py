"""Exports whose clients never read cannot take the database away (issue 13, item 1).

Against a live `chatproxy serve` with a pool of 10: ten exports of an 8 MB session, their
clients' sockets open but never read, leave other users' turns, session reads and `/ready`
working; each export holds a spool, not a connection. A client that reads nothing for
`CHATPROXY_SEND_TIMEOUT` is disconnected, which frees its place; a user's exports beyond
`CHATPROXY_EXPORTS_PER_USER` get 429 at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from proxy.errors import TooManyRequests
from tests.conftest import User
from tests.fault_helpers import FakeUpstream, Serve, serve_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

MESSAGES, TEXT = 800, 10_000  # 8 MB of message text
SEND_TIMEOUT = 3


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


async def big_session(db: asyncpg.Connection, user: User) -> str:
    sid = f"sess_big{user.id[-8:]}"
    await db.execute("INSERT INTO chat_sessions (id, user_id, max_history_messages) "
                     "VALUES ($1, $2, 20)", sid, user.id)
    await db.execute(
        """
        INSERT INTO chat_messages (session_id, seq, role, body, tokens)
        SELECT $1, g, 'user', json_build_object('role', 'user', 'content',
                                                repeat(chr(97 + g % 26), $3))::text, 100
        FROM generate_series(1, $2) g
        """, sid, MESSAGES, TEXT)
    await db.execute("UPDATE chat_sessions SET next_seq = $2 + 1, message_count = $2 "
                     "WHERE id = $1", sid, MESSAGES)
    return sid


def unread_export(server: Serve, user: User, sid: str) -> socket.socket:
    """An export requested on a socket that will never read (a tiny receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /v1/chat/sessions/{sid}/export HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {user.key}\r\n\r\n".encode())
    return sock


def cut_off(sock: socket.socket) -> bool:
    """Whether the server gave up on this client: what it can still read ends before the
    response does (no last chunk), in a reset or an end of the connection."""
    sock.settimeout(5)
    received = b""
    try:
        while data := sock.recv(1 << 16):
            received += data
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False  # the connection is still open: nobody cut it
    return b"\r\n0\r\n\r\n" not in received


async def test_exports_whose_clients_never_read_leave_everyone_else_served(
    fake: FakeUpstream, database_url: str, alice: User, bob: User, db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    env = serve_env(database_url, fake.base_url, tmp_path, CHATPROXY_DB_POOL_SIZE="10",
                    CHATPROXY_EXPORTS_PER_USER="10", CHATPROXY_SEND_TIMEOUT=str(SEND_TIMEOUT),
                    CHATPROXY_LOG_LEVEL="warning")
    server = Serve(env, tmp_path / "serve.log").start()
    socks: list[socket.socket] = []
    try:
        sid = await big_session(db, alice)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            whole = await http.get(f"/v1/chat/sessions/{sid}/export", headers=alice.headers)
            assert whole.status_code == 200
            assert len(whole.content) > MESSAGES * TEXT
            assert len(json.loads(whole.content)["messages"]) == MESSAGES
            socks = [unread_export(server, alice, sid) for _ in range(10)]

            async def spooled() -> int:  # exports reading the database (none, once spooled)
                return int(await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query LIKE '%FROM chat_messages WHERE session_id%' AND state <> 'idle'"))
            await asyncio.sleep(1)
            for _ in range(100):
                if await spooled() == 0:
                    break
                await asyncio.sleep(0.1)
            # Ten exports under way, none read: bob is served as if nothing happened.
            r = await http.post("/v1/chat/sessions", json={}, headers=bob.headers)
            assert r.status_code == 201, r.text
            mine = r.json()["id"]
            for _ in range(5):
                r = await http.post("/v1/chat/completions", headers=bob.headers, json={
                    "model": "echo", "session_id": mine,
                    "messages": [{"role": "user", "content": "still here?"}]})
                assert r.status_code == 200, r.text
                assert (await http.get(f"/v1/chat/sessions/{mine}/messages",
                                       headers=bob.headers)).status_code == 200
                assert (await http.get("/ready")).status_code == 200
            r = await http.get(f"/v1/chat/sessions/{mine}", headers=bob.headers)
            assert r.json()["message_count"] == 10
            # Alice's own other requests are served too.
            assert (await http.get(f"/v1/chat/sessions/{sid}", headers=alice.headers)
                    ).status_code == 200
            # None of them read for the send timeout: each is disconnected, its place freed.
            await asyncio.sleep(SEND_TIMEOUT + 2)
            assert all(await asyncio.gather(*(asyncio.to_thread(cut_off, s) for s in socks)))
            again = await http.get(f"/v1/chat/sessions/{sid}/export", headers=alice.headers)
            assert again.content == whole.content
    finally:
        for sock in socks:
            sock.close()
        server.stop()
    assert "Traceback" not in server.log()


async def test_a_users_exports_beyond_the_budget_get_429(
    fake: FakeUpstream, database_url: str, carol_and_dave: tuple[User, User],
    db: asyncpg.Connection, tmp_path: Path,
) -> None:
    carol, dave = carol_and_dave
    env = serve_env(database_url, fake.base_url, tmp_path, CHATPROXY_EXPORTS_PER_USER="2",
                    CHATPROXY_LOG_LEVEL="warning")
    server = Serve(env, tmp_path / "serve.log").start()
    socks: list[socket.socket] = []
    try:
        sid, others = await big_session(db, carol), await big_session(db, dave)
        socks = [unread_export(server, carol, sid) for _ in range(2)]
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            for _ in range(100):  # until both are under way
                r = await http.get(f"/v1/chat/sessions/{sid}/export", headers=carol.headers)
                if r.status_code == 429:
                    break
                await asyncio.sleep(0.05)
            assert (r.status_code, r.json()) == (429, TooManyRequests(
                "Too many exports under way for this user (at most 2); try again when one has "
                "finished").body())
            # Another user's export is not hers to wait for.
            r = await http.get(f"/v1/chat/sessions/{others}/export", headers=dave.headers)
            assert r.status_code == 200 and len(json.loads(r.content)["messages"]) == MESSAGES
            for sock in socks:  # her clients go away: her places are free again
                sock.close()
            socks = []
            for _ in range(100):
                r = await http.get(f"/v1/chat/sessions/{sid}/export", headers=carol.headers)
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert r.status_code == 200, r.text
    finally:
        for sock in socks:
            sock.close()
        server.stop()


@pytest.fixture
async def carol_and_dave(db: asyncpg.Connection) -> tuple[User, User]:
    from tests.conftest import make_user

    return await make_user(db), await make_user(db)
