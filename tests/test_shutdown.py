"""SIGTERM to a real `chatproxy serve` with a stream in flight (issue 5, item 6).

The server stops accepting connections at once, lets the stream run to its end within
CHATPROXY_SHUTDOWN_GRACE and stores it complete; a stream still open at the deadline is cut and
stored as incomplete. Either way the process exits on its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import respx

from proxy.config import Settings
from tests.conftest import UPSTREAM_KEY, User
from tests.fault_helpers import FakeUpstream, Serve, app_client, serve_env
from tests.turns import new_session

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def log_records(server: Serve) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


async def stored(db: asyncpg.Connection, session_id: str) -> list[tuple[str, Any, str]]:
    rows = await db.fetch(
        "SELECT role, body, status FROM chat_messages WHERE session_id = $1 ORDER BY seq",
        session_id,
    )
    return [(r["role"], json.loads(r["body"])["content"], r["status"]) for r in rows]


async def stream_through_sigterm(
    server: Serve, user: User, model: str
) -> tuple[str, list[bytes], bool]:
    """Open a streamed turn, SIGTERM the server after its first event, read what follows.

    Returns the session id, the events read, and whether new connections were refused while
    the stream was still open.
    """
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        r = await client.post("/v1/chat/sessions", json={}, headers=user.headers)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        events: list[bytes] = []
        refused = False
        body = {"model": model, "session_id": sid, "stream": True,
                "messages": [{"role": "user", "content": "count"}]}
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers=user.headers) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            try:
                async for line in lines:
                    if not line:
                        continue
                    events.append(line.encode())
                    if len(events) == 2:  # the role chunk and a first part have arrived
                        server.terminate()
                        for _ in range(100):
                            refused = await asyncio.to_thread(refuses_connections, server.port)
                            if refused:
                                break
                            await asyncio.sleep(0.05)
            except httpx.RemoteProtocolError:
                pass  # cut at the deadline
        return sid, events, refused


async def test_sigterm_lets_the_stream_finish_and_stores_it_complete(
    fake: FakeUpstream, database_url: str, alice: User, db: asyncpg.Connection, tmp_path: Path
) -> None:
    env = serve_env(database_url, fake.base_url, tmp_path, CHATPROXY_SHUTDOWN_GRACE="30",
                    CHATPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY)
    server = Serve(env, tmp_path / "serve.log").start()
    try:
        sid, events, refused = await stream_through_sigterm(server, alice, "slow:8:0.25")
        assert await asyncio.to_thread(server.wait, 60) == 0
    finally:
        server.stop()
    assert refused, "a new connection was accepted after SIGTERM"
    assert events[-1] == b"data: [DONE]"
    assert len(events) == 1 + 8 + 1
    whole = "".join(f"part{i} " for i in range(8))
    assert await stored(db, sid) == [
        ("user", "count", "complete"), ("assistant", whole, "complete")]


@pytest.mark.parametrize("grace", ["0", "1"])
async def test_a_stream_open_at_the_grace_deadline_is_stored_incomplete(
    fake: FakeUpstream, database_url: str, alice: User, db: asyncpg.Connection, tmp_path: Path,
    grace: str,
) -> None:
    env = serve_env(database_url, fake.base_url, tmp_path, CHATPROXY_SHUTDOWN_GRACE=grace,
                    CHATPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY)
    server = Serve(env, tmp_path / "serve.log").start()
    try:
        sid, events, refused = await stream_through_sigterm(server, alice, "slow:200:0.25")
        assert await asyncio.to_thread(server.wait, 60) == 0
    finally:
        server.stop()
    assert refused
    assert b"data: [DONE]" not in events
    rows = await stored(db, sid)
    assert [(role, status) for role, _, status in rows] == [
        ("user", "complete"), ("assistant", "incomplete")]
    assert rows[0][1] == "count"
    received = "".join(json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events)
    # What reached the client was stored, and maybe a little more that was on its way.
    assert rows[1][1].startswith(received)
    assert rows[1][1] == "".join(f"part{i} " for i in range(len(rows[1][1].split())))
    assert len(rows[1][1].split()) < 200
    # One warning line for the cut, and no traceback from uvicorn.
    records = log_records(server)
    assert not [r for r in records if "exc" in r or r["msg"].startswith("Exception in ASGI")]
    assert [r["level"] for r in records
            if r["msg"] == "a response still running at the shutdown deadline was cut"] == [
        "warning"]


@pytest.mark.parametrize("with_session", [True, False])
async def test_a_request_waiting_on_the_upstream_at_the_deadline_gets_a_503(
    fake: FakeUpstream, database_url: str, alice: User, db: asyncpg.Connection, tmp_path: Path,
    with_session: bool,
) -> None:
    env = serve_env(database_url, fake.base_url, tmp_path, CHATPROXY_SHUTDOWN_GRACE="1",
                    CHATPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY)
    server = Serve(env, tmp_path / "serve.log").start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            r = await client.post("/v1/chat/sessions", json={}, headers=alice.headers)
            sid = r.json()["id"]
            body: dict[str, Any] = {"model": "hang", "messages": [{"role": "user", "content": "x"}]}
            if with_session:
                body["session_id"] = sid
            seen = len(fake.requests)
            waiting = asyncio.ensure_future(
                client.post("/v1/chat/completions", json=body, headers=alice.headers))
            for _ in range(200):  # until the upstream has this request
                if any(b.get("model") == "hang" for _, b in fake.requests[seen:]):
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the request never reached the upstream")
            server.terminate()
            r = await waiting
        assert await asyncio.to_thread(server.wait, 60) == 0
    finally:
        server.stop()
    assert (r.status_code, r.json()) == (503, {"error": {
        "message": "The server is shutting down, try again", "type": "server_error",
        "param": None, "code": "server_shutting_down"}})
    assert r.headers["x-request-id"]
    assert await stored(db, sid) == []
    records = log_records(server)
    assert not [r for r in records if "exc" in r]
    assert [r["level"] for r in records if r["msg"].endswith("was answered 503")] == ["warning"]


def cut_cleanly(server: Serve) -> None:
    """The log of a shutdown that cut one stream: the one warning, no traceback, no error."""
    records = log_records(server)
    assert "Traceback" not in server.log()
    assert [r for r in records if "exc" in r or r["level"] in ("error", "critical")] == []
    assert [r["level"] for r in records
            if r["msg"] == "a response still running at the shutdown deadline was cut"] == [
        "warning"]


@pytest.mark.parametrize(("how", "workers"), [
    ("ctrl_c_twice", 1), ("ctrl_c_twice", 2), ("sigterm_then_deadline", 1),
    ("sigterm_then_deadline", 2)])
async def test_a_forced_shutdown_stores_the_stream_as_incomplete_and_logs_one_warning(
    fake: FakeUpstream, database_url: str, alice: User, db: asyncpg.Connection, tmp_path: Path,
    how: str, workers: int,
) -> None:
    """Ctrl-C twice (the second forces the exit at once) or SIGTERM with a grace that runs out:
    what had arrived of the stream is stored as incomplete, the process exits 0, and the log has
    the one warning, no traceback (issue 14, item 2). Ctrl-C in a terminal signals the whole
    process group (with `--workers 2`: the supervisor and its workers), hence a group here."""
    grace = "30" if how == "ctrl_c_twice" else "1"
    env = serve_env(database_url, fake.base_url, tmp_path, CHATPROXY_SHUTDOWN_GRACE=grace,
                    CHATPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY)
    server = Serve(env, tmp_path / "serve.log", preexec=os.setsid,
                   args=("--workers", str(workers))).start()
    assert server.process is not None
    group = server.process.pid
    loop = asyncio.get_running_loop()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            r = await client.post("/v1/chat/sessions", json={}, headers=alice.headers)
            sid = r.json()["id"]
            body = {"model": "slow:200:0.25", "session_id": sid, "stream": True,
                    "messages": [{"role": "user", "content": "count"}]}
            events: list[bytes] = []
            async with client.stream("POST", "/v1/chat/completions", json=body,
                                     headers=alice.headers) as response:
                try:
                    async for line in response.aiter_lines():
                        if line:
                            events.append(line.encode())
                        if len(events) == 3:  # the role chunk and two parts
                            if how == "ctrl_c_twice":
                                os.killpg(group, signal.SIGINT)
                                await asyncio.sleep(0.5)
                                os.killpg(group, signal.SIGINT)
                            else:
                                server.terminate()
                            signalled = loop.time()
                except httpx.RemoteProtocolError:
                    pass  # cut
            assert await asyncio.to_thread(server.wait, 60) == 0
            if how == "ctrl_c_twice":  # at once, not after the 30 s grace
                assert loop.time() - signalled < 15
    finally:
        server.stop()
    assert b"data: [DONE]" not in events
    rows = await stored(db, sid)
    assert [(role, status) for role, _, status in rows] == [
        ("user", "complete"), ("assistant", "incomplete")]
    received = "".join(json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events)
    assert rows[1][1].startswith(received) and len(rows[1][1].split()) < 200
    cut_cleanly(server)


async def test_a_request_cancelled_without_a_shutdown_is_not_answered_as_one(
    settings: Settings, alice: User, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the server's shutdown cancels with SHUTDOWN_CUT; any other cancellation (here, the
    caller's) goes through, and nothing claims the server was shutting down."""
    waiting = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        waiting.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    upstream = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)
    upstream.post("/chat/completions").mock(side_effect=hang)
    async with app_client(settings, upstream) as client:
        sid = await new_session(client, alice)
        task = asyncio.ensure_future(client.post("/v1/chat/completions", headers=alice.headers,
                                                 json={"model": "gpt-4o", "session_id": sid,
                                                       "messages": [{"role": "user",
                                                                     "content": "x"}]}))
        await asyncio.wait_for(waiting.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert "shutdown" not in caplog.text
