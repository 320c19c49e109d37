"""Fault injection: a database that stops, restarts, loses connections or runs out of them, and
upstreams that hang, redirect or answer garbage (issue 5, items 4 and 5).

The database faults run on a private embedded cluster of this module's own, so stopping it
breaks no other test. Nothing here mocks the database.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
import respx

from proxy import auth
from proxy.config import Settings
from proxy.errors import DatabaseUnavailable, UpstreamError, UpstreamTimeout
from proxy.migrate import migrate
from proxy.store import users
from proxy.upstream import MAX_UPSTREAM_BODY
from tests.conftest import ADMIN_KEY, ROOT, UPSTREAM, UPSTREAM_KEY, User, make_user
from tests.fault_helpers import PrivateCluster, answering, app_client, completion, scratch_dir
from tests.turns import new_session

UNAVAILABLE = DatabaseUnavailable().body()
TEST_APP = "faults-test"  # application_name of this module's own connections
# The contract's bound for a 503 when the database is down; a hang detector, not a benchmark.
WITHIN = 2.0


def chat(session_id: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    if session_id is not None:
        body["session_id"] = session_id
    return {**body, **extra}


# --- a private cluster ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    with scratch_dir("chatproxy-faultpg-") as root:
        private = PrivateCluster(root)
        yield private
        if private.running():
            private.stop()


@pytest.fixture(scope="module")
async def fault_url(cluster: PrivateCluster) -> str:
    admin = await asyncpg.connect(cluster.url)
    try:
        await admin.execute("CREATE DATABASE chatproxy_faults")
    finally:
        await admin.close()
    url = cluster.url.replace("/postgres?", "/chatproxy_faults?")
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return url


@pytest.fixture
def running(cluster: PrivateCluster) -> Iterator[PrivateCluster]:
    """The cluster, running at the start and the end of the test whatever happened between."""
    if not cluster.running():
        cluster.start()
    yield cluster
    if not cluster.running():
        cluster.start()


@pytest.fixture
async def fdb(running: PrivateCluster, fault_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(fault_url, server_settings={"application_name": TEST_APP})
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def fsettings(fault_url: str) -> Settings:
    return Settings(
        database_url=fault_url, upstream_base_url=UPSTREAM, upstream_api_key=UPSTREAM_KEY,
        admin_key=ADMIN_KEY, models_file=str(ROOT / "config" / "models.toml"), db_pool_size=3,
    )


@pytest.fixture
async def carol(fdb: asyncpg.Connection) -> User:
    return await make_user(fdb)


async def stored(conn: asyncpg.Connection, session_id: str) -> list[tuple[int, str, str]]:
    rows = await conn.fetch(
        "SELECT seq, role, body FROM chat_messages WHERE session_id = $1 ORDER BY seq", session_id
    )
    return [(r["seq"], r["role"], json.loads(r["body"])["content"]) for r in rows]


async def terminate_others(conn: asyncpg.Connection, where: str = "true") -> int:
    """pg_terminate_backend on every backend of this database but this module's own."""
    count: int = await conn.fetchval(
        f"""
        SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND application_name <> '{TEST_APP}' AND {where}
        """
    )
    return count


async def waiting_backend(conn: asyncpg.Connection, exclude: set[int]) -> int:
    """The pid of a proxy backend blocked on a lock (its turn's write), once there is one."""
    for _ in range(500):
        pid = await conn.fetchval(
            f"""
            SELECT pid FROM pg_stat_activity
            WHERE datname = current_database() AND wait_event_type = 'Lock'
              AND application_name <> '{TEST_APP}' AND NOT (pid = ANY($1::int[]))
            """,
            list(exclude),
        )
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.02)
    raise AssertionError("no write ever waited on the session's lock")


# --- the database goes down, comes back ----------------------------------------------------


async def test_database_down_fails_closed_fast_and_sessionless_chat_passes(
    running: PrivateCluster, fsettings: Settings, carol: User
) -> None:
    upstream, route = answering("passed")
    async with app_client(fsettings, upstream) as client:
        sid = await new_session(client, carol)
        warm = await client.post("/v1/chat/completions", json=chat(), headers=carol.headers)
        assert warm.status_code == 200
        await asyncio.to_thread(running.stop)  # the app's loop runs on while the server stops

        requests = [
            ("GET", "/ready", None),
            ("GET", "/v1/chat/sessions", None),
            ("POST", "/v1/chat/sessions", {}),
            ("GET", f"/v1/chat/sessions/{sid}", None),
            ("PATCH", f"/v1/chat/sessions/{sid}", {"session_name": "x"}),
            ("DELETE", f"/v1/chat/sessions/{sid}", None),
            ("GET", f"/v1/chat/sessions/{sid}/messages", None),
            ("POST", "/v1/chat/completions", chat(sid)),
            ("POST", "/v1/chat/completions", chat(sid, stream=True)),
        ]
        for method, path, body in requests:
            r = await asyncio.wait_for(
                client.request(method, path, json=body, headers=carol.headers), WITHIN
            )
            assert (method, path, r.status_code, r.json()) == (method, path, 503, UNAVAILABLE)
        assert route.call_count == 1  # only the warm-up: no session turn went upstream

        # Without session_id nothing is stored, so the request still goes through, on the
        # strength of the key having been verified moments ago (proxy/keylease.py).
        r = await asyncio.wait_for(
            client.post("/v1/chat/completions", json=chat(), headers=carol.headers), WITHIN
        )
        assert r.status_code == 200
        assert r.json() == completion("passed")
        assert route.call_count == 2
        # A key this process never verified is not taken on trust: fail closed.
        stranger = User("user_x", "x", "sk-cp-" + "A" * 43, "key_x")
        r = await client.post("/v1/chat/completions", json=chat(), headers=stranger.headers)
        assert (r.status_code, r.json()) == (503, UNAVAILABLE)
        assert route.call_count == 2

        await asyncio.to_thread(running.start)
        # The same process, no restart: the pool reconnects on its own.
        r = await client.get("/ready")
        assert (r.status_code, r.json()) == (200, {"status": "ready"})
        r = await client.get(f"/v1/chat/sessions/{sid}", headers=carol.headers)
        assert r.status_code == 200
        assert r.json()["id"] == sid
        r = await client.post("/v1/chat/completions", json=chat(sid), headers=carol.headers)
        assert r.status_code == 200
        r = await client.post("/v1/chat/completions", json=chat(), headers=stranger.headers)
        assert r.status_code == 401


def mcp_call(tool: str, **arguments: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments}}


def mcp_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": "2025-11-25"}


async def test_mcp_with_the_database_down_is_503_or_a_tool_error(
    running: PrivateCluster, fsettings: Settings, carol: User, fdb: asyncpg.Connection
) -> None:
    spare = auth.generate_key()  # carol's too, but never used before the outage
    assert await users.create_key(fdb, carol.id, auth.hash_key(spare), spare[:12], "spare")
    async with app_client(fsettings) as client:
        r = await client.post("/mcp", json=mcp_call("list_sessions"),
                              headers=mcp_headers(carol.key))
        assert r.status_code == 200 and not r.json()["result"]["isError"], r.text
        await asyncio.to_thread(running.stop)

        # A key this process never verified is refused before the MCP layer: fail closed.
        r = await asyncio.wait_for(client.post(
            "/mcp", json=mcp_call("list_sessions"), headers=mcp_headers(spare)), WITHIN)
        assert (r.status_code, r.json()) == (503, UNAVAILABLE)
        # The key just verified may still pass under its lease; then the tool says it.
        r = await asyncio.wait_for(client.post(
            "/mcp", json=mcp_call("list_sessions"), headers=mcp_headers(carol.key)), WITHIN)
        if r.status_code == 200:
            result = r.json()["result"]
            assert result["isError"] and result["content"][0]["text"] == (
                "Error executing tool list_sessions: " + UNAVAILABLE["error"]["message"])
        else:
            assert (r.status_code, r.json()) == (503, UNAVAILABLE)

        await asyncio.to_thread(running.start)
        r = await client.post("/mcp", json=mcp_call("list_sessions"),
                              headers=mcp_headers(spare))
        assert r.status_code == 200 and not r.json()["result"]["isError"], r.text


async def test_pool_recovers_after_restart_with_every_connection_in_use_before(
    running: PrivateCluster, fsettings: Settings, carol: User, fault_url: str
) -> None:
    upstream, _ = answering("ok")
    async with app_client(fsettings, upstream) as client:
        sid = await new_session(client, carol)
        # Open every connection the pool may hold, so each one is stale after the restart.
        answers = await asyncio.gather(*(
            client.post("/v1/chat/completions", json=chat(sid), headers=carol.headers)
            for _ in range(6)
        ))
        assert [a.status_code for a in answers] == [200] * 6
        assert client.app.state.rt.pool.get_size() == 3  # all of them open
        # Stopped and started while the app's loop is blocked: the pool's connections die
        # unnoticed, as in a failover. The first request to use one finds out (503); the
        # rest of the pool is replaced then, so no other request fails.
        running.stop()
        running.start()
        statuses = []
        for _ in range(5):  # more requests than the pool has connections
            r = await client.get(f"/v1/chat/sessions/{sid}", headers=carol.headers)
            statuses.append(r.status_code)
        assert statuses[0] in (200, 503)
        assert statuses[1:] == [200] * 4
        r = await client.post("/v1/chat/completions", json=chat(sid), headers=carol.headers)
        assert r.status_code == 200
    conn = await asyncpg.connect(fault_url)
    try:
        assert len(await stored(conn, sid)) == 14
    finally:
        await conn.close()


# --- a connection killed between the upstream's reply and the write ---------------------------


async def test_connections_killed_before_the_write_turn_stored_once(
    fsettings: Settings, carol: User, fdb: asyncpg.Connection, fault_url: str
) -> None:
    upstream = respx.Router(base_url=UPSTREAM, assert_all_called=False)

    async def reply_after_killing_the_pool(request: httpx.Request) -> httpx.Response:
        killer = await asyncpg.connect(fault_url, server_settings={"application_name": TEST_APP})
        try:
            assert await terminate_others(killer) >= 1
        finally:
            await killer.close()
        return httpx.Response(200, json=completion("survived"))

    upstream.post("/chat/completions").mock(side_effect=reply_after_killing_the_pool)
    async with app_client(fsettings, upstream) as client:
        sid = await new_session(client, carol)
        r = await client.post("/v1/chat/completions", json=chat(sid), headers=carol.headers)
        assert r.status_code == 200, r.text
        assert r.json() == completion("survived")
    assert await stored(fdb, sid) == [(1, "user", "hi"), (2, "assistant", "survived")]


@asynccontextmanager
async def session_locked(url: str, session_id: str) -> AsyncIterator[asyncpg.Connection]:
    """Holds the session row locked (on a connection of its own) until the block ends, so a
    turn's write waits there. Not on the connection that watches pg_stat_activity: that view is
    a snapshot per transaction."""
    conn = await asyncpg.connect(url, server_settings={"application_name": TEST_APP})
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM chat_sessions WHERE id = $1 FOR UPDATE", session_id)
            yield conn
    finally:
        await conn.close()


async def test_write_connection_killed_is_retried_once_on_a_fresh_one(
    fsettings: Settings, carol: User, fdb: asyncpg.Connection, fault_url: str
) -> None:
    upstream, route = answering("kept")
    async with app_client(fsettings, upstream) as client:
        sid = await new_session(client, carol)
        async with session_locked(fault_url, sid):
            task = asyncio.create_task(
                client.post("/v1/chat/completions", json=chat(sid), headers=carol.headers)
            )
            first = await waiting_backend(fdb, set())
            assert await fdb.fetchval("SELECT pg_terminate_backend($1)", first)
            retry = await waiting_backend(fdb, {first})  # the retry, on another connection
            assert retry != first
        r = await asyncio.wait_for(task, 30)
        assert r.status_code == 200, r.text
        assert r.json() == completion("kept")
    assert route.call_count == 1
    assert await stored(fdb, sid) == [(1, "user", "hi"), (2, "assistant", "kept")]


async def test_write_failing_twice_is_503_and_stores_nothing(
    fsettings: Settings, carol: User, fdb: asyncpg.Connection, fault_url: str
) -> None:
    upstream, route = answering("lost")
    async with app_client(fsettings, upstream) as client:
        sid = await new_session(client, carol)
        async with session_locked(fault_url, sid):
            task = asyncio.create_task(
                client.post("/v1/chat/completions", json=chat(sid), headers=carol.headers)
            )
            first = await waiting_backend(fdb, set())
            assert await fdb.fetchval("SELECT pg_terminate_backend($1)", first)
            second = await waiting_backend(fdb, {first})
            assert await fdb.fetchval("SELECT pg_terminate_backend($1)", second)
            r = await asyncio.wait_for(task, 30)
        assert (r.status_code, r.json()) == (503, UNAVAILABLE)
        # Neither attempt committed anything: the turn is not there at all, not half there.
        assert await stored(fdb, sid) == []
        session = await client.get(f"/v1/chat/sessions/{sid}", headers=carol.headers)
        assert session.json()["message_count"] == 0
    assert route.call_count == 1


# --- a saturated pool ---------------------------------------------------------------------------


async def test_saturated_pool_answers_503_after_the_acquire_timeout(
    fsettings: Settings, carol: User, fdb: asyncpg.Connection
) -> None:
    from dataclasses import replace

    upstream, route = answering("x")
    settings = replace(fsettings, db_pool_size=1, db_acquire_timeout=0.3)
    async with app_client(settings, upstream) as client:
        sid = await new_session(client, carol)
        pool = client.app.state.rt.pool
        held = await pool.acquire()
        try:
            for method, path, body in [
                ("GET", f"/v1/chat/sessions/{sid}", None),
                ("GET", "/ready", None),
                ("POST", "/v1/chat/completions", chat(sid)),
            ]:
                r = await asyncio.wait_for(
                    client.request(method, path, json=body, headers=carol.headers), 10
                )
                assert (path, r.status_code, r.json()) == (path, 503, UNAVAILABLE)
        finally:
            pool.release(held)
        assert route.call_count == 0
        r = await client.get(f"/v1/chat/sessions/{sid}", headers=carol.headers)
        assert r.status_code == 200


# --- upstream faults ------------------------------------------------------------------------------


class HangingServer:
    """Accepts, reads the request, never answers; counts the connections the proxy closed."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.accepted = 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> HangingServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        while await reader.read(65536):
            pass  # until the proxy gives up and closes the connection
        self.closed.set()
        writer.close()

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("with_session", [False, True])
async def test_upstream_hang_is_504_and_the_connection_closed(
    settings: Settings, alice: User, db: asyncpg.Connection, stream: bool, with_session: bool
) -> None:
    from dataclasses import replace

    async with HangingServer() as hanging:
        slow = replace(settings, upstream_base_url=hanging.url, upstream_timeout=0.5)
        async with app_client(slow) as client:
            sid = await new_session(client, alice) if with_session else None
            r = await client.post(
                "/v1/chat/completions", json=chat(sid, stream=stream), headers=alice.headers
            )
            expected = UpstreamTimeout("The upstream did not answer in time").body()
            assert (r.status_code, r.json()) == (504, expected)
            await asyncio.wait_for(hanging.closed.wait(), 10)
            assert hanging.accepted == 1
            if sid is not None:
                assert await stored(db, sid) == []


def error_502(message: str) -> dict[str, Any]:
    return UpstreamError(message).body()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("with_session", [False, True])
async def test_upstream_redirect_is_502_and_not_followed(
    client: Any, upstream: respx.Router, alice: User, db: asyncpg.Connection,
    stream: bool, with_session: bool,
) -> None:
    route = upstream.post("/chat/completions").mock(return_value=httpx.Response(
        307, headers={"location": "http://attacker.test/steal"}))
    sid = await new_session(client, alice) if with_session else None
    r = await client.post(
        "/v1/chat/completions", json=chat(sid, stream=stream), headers=alice.headers
    )
    assert (r.status_code, r.json()) == (
        502, error_502("The upstream answered with a redirect, which is not followed"))
    assert route.call_count == 1  # and no request to the Location (respx would refuse it)
    if sid is not None:
        assert await stored(db, sid) == []


async def test_upstream_non_json_body_is_502_and_stores_nothing(
    client: Any, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, content=b"<html>gateway</html>", headers={"content-type": "text/html"}))
    sid = await new_session(client, alice)
    r = await client.post("/v1/chat/completions", json=chat(sid), headers=alice.headers)
    assert (r.status_code, r.json()) == (
        502, error_502("The upstream answered with a body that is not JSON"))
    assert await stored(db, sid) == []


async def test_upstream_oversized_body_is_502_and_stores_nothing(
    client: Any, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    huge = b'{"x": "' + b"a" * MAX_UPSTREAM_BODY + b'"}'
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, content=huge, headers={"content-type": "application/json"}))
    sid = await new_session(client, alice)
    r = await client.post("/v1/chat/completions", json=chat(sid), headers=alice.headers)
    assert (r.status_code, r.json()) == (502, error_502("The upstream's answer is too large"))
    assert await stored(db, sid) == []


@pytest.mark.parametrize("with_session", [False, True])
async def test_upstream_200_with_error_body_is_passed_through(
    client: Any, upstream: respx.Router, alice: User, db: asyncpg.Connection, with_session: bool
) -> None:
    raw = b'{"error": {"message": "model overloaded", "type": "server_error", "code": null}}'
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, content=raw, headers={"content-type": "application/json"}))
    sid = await new_session(client, alice) if with_session else None
    r = await client.post("/v1/chat/completions", json=chat(sid), headers=alice.headers)
    assert r.status_code == 200
    assert r.content == raw
    if sid is not None:
        assert await stored(db, sid) == []


def test_key_cache_forgets_refused_and_stale_keys_and_stays_bounded() -> None:
    from proxy.keylease import KeyLease

    now = [0.0]
    cache = KeyLease(ttl=120, max_entries=2, clock=lambda: now[0])
    cache.remember(b"a", "user_a", cache.generation)
    assert cache.recent(b"a") == "user_a"
    now[0] = 120.5
    assert cache.recent(b"a") is None  # verified too long ago
    cache.remember(b"a", "user_a", cache.generation)
    cache.forget(b"a")  # the database refused it since
    assert cache.recent(b"a") is None
    for key in (b"x", b"y", b"z"):
        cache.remember(key, "u", cache.generation)
    assert [cache.recent(k) for k in (b"x", b"y", b"z")] == [None, "u", "u"]


class _BreaksOff(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"id": "chatcmpl-1", "choices": ['
        raise httpx.ReadError("connection reset")


@pytest.mark.parametrize("with_session", [False, True])
async def test_a_non_streamed_answer_that_breaks_off_is_502(
    client: Any, upstream: respx.Router, alice: User, db: asyncpg.Connection, with_session: bool
) -> None:
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, stream=_BreaksOff(), headers={"content-type": "application/json"}))
    sid = await new_session(client, alice) if with_session else None
    r = await client.post("/v1/chat/completions", json=chat(sid), headers=alice.headers)
    assert (r.status_code, r.json()) == (502, error_502("The upstream's answer broke off"))
    if sid is not None:
        assert await stored(db, sid) == []
