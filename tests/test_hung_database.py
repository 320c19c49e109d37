"""A database that hangs (issue 13, item 6): every statement of a request is bounded client-side.

A relay in front of PostgreSQL that stops passing bytes (sockets open, nothing answers), and the
embedded server stopped with SIGSTOP under a live `chatproxy serve`: each request answers 503
`database_unavailable` in about `CHATPROXY_DB_STATEMENT_TIMEOUT` (plus the acquire timeout for
a turn's write, which is retried once), the connection that timed out is dropped, and the same
process serves again once the database is back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import respx

from proxy.config import Settings
from proxy.errors import DatabaseUnavailable
from proxy.migrate import migrate
from tests.conftest import ADMIN_KEY, User, configured, make_user
from tests.fault_helpers import (
    FakeUpstream,
    LiveClient,
    PrivateCluster,
    Relay,
    Serve,
    answering,
    app_client,
    completion,
    serve_env,
)
from tests.turns import new_session

UNAVAILABLE = DatabaseUnavailable().body()
# A hang detector, not a benchmark: the statement timeout (2 s) plus the acquire timeout (1.5 s)
# for a write's retry, with room for a loaded machine. asyncpg's old default held a request 60 s.
WITHIN = 5.0


@pytest.fixture
def relay(database_url: str) -> Iterator[Relay]:
    with Relay(database_url) as running:
        yield running


async def timed(client: LiveClient, method: str, path: str, **kwargs: Any
                ) -> tuple[httpx.Response, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(20):  # fails here, not at pytest's timeout, if the request hangs
        r = await client.request(method, path, **kwargs)
    return r, loop.time() - started


async def warm(client: LiveClient, relay: Relay) -> None:
    """The relay passing bytes again, and a pooled connection through it to time out on."""
    relay.resume()  # cuts the connections through it: the pool finds its idle ones dead
    for _ in range(10):
        r = await client.get("/ready")
        if r.status_code == 200:
            return
    raise AssertionError(f"the app never got the database back: {r.text}")


def pool_size(client: LiveClient) -> int:
    size: int = client.app.state.rt.pool.get_size()
    return size


@pytest.mark.timeout(120)
async def test_every_read_answers_503_within_seconds_and_drops_the_connection(
    settings: Settings, relay: Relay, alice: User, bob: User
) -> None:
    upstream, route = answering("fine")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with app_client(configured(settings, database_url=relay.url()), upstream) as client:
        sid = await new_session(client, alice)
        chat = {"model": "gpt-4o", "session_id": sid,
                "messages": [{"role": "user", "content": "hi"}]}
        cases: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"/v1/chat/sessions/{sid}", {"headers": alice.headers}),
            ("GET", f"/chat/sessions/{sid}/messages", {"headers": alice.headers}),
            ("PATCH", f"/v1/chat/sessions/{sid}", {"headers": alice.headers, "json": {}}),
            ("POST", "/v1/chat/completions", {"headers": alice.headers, "json": chat}),
            ("GET", "/v1/chat/sessions", {"headers": bob.headers}),  # a key never verified
            ("GET", "/admin/users", {"headers": admin}),
            ("GET", f"/v1/chat/sessions/{sid}/export", {"headers": alice.headers}),
        ]
        for method, path, kwargs in cases:
            await warm(client, relay)
            relay.stall()
            r, took = await timed(client, method, path, **kwargs)
            assert (method, path, r.status_code, r.json()) == (method, path, 503, UNAVAILABLE)
            assert took < WITHIN, (method, path, took)
            assert pool_size(client) == 0  # the connection that timed out was not kept
        assert route.call_count == 0
        await warm(client, relay)  # the same app, no restart
        r = await client.get(f"/v1/chat/sessions/{sid}", headers=alice.headers)
        assert (r.status_code, r.json()["message_count"]) == (200, 0)


@pytest.mark.timeout(120)
async def test_a_turn_whose_write_hangs_answers_503_and_stores_nothing(
    settings: Settings, relay: Relay, alice: User, db: asyncpg.Connection
) -> None:
    upstream = respx.Router(base_url=settings.upstream_base_url, assert_all_called=False)

    def stall_then_answer(request: httpx.Request) -> httpx.Response:
        relay.stall()  # the database hangs between the history read and the turn's write
        return httpx.Response(200, json=completion("fine"))

    upstream.post("/chat/completions").mock(side_effect=stall_then_answer)
    async with app_client(configured(settings, database_url=relay.url()), upstream) as client:
        sid = await new_session(client, alice)
        body = {"model": "gpt-4o", "session_id": sid,
                "messages": [{"role": "user", "content": "hi"}]}
        r, took = await timed(client, "POST", "/v1/chat/completions", json=body,
                              headers=alice.headers)
        assert (r.status_code, r.json(), took < WITHIN) == (503, UNAVAILABLE, True)
        assert pool_size(client) == 0
        # A stream's write: the stream ends with the error event instead of hanging.
        upstream.post("/chat/completions").mock(side_effect=lambda request: (
            relay.stall(), httpx.Response(200, headers={"content-type": "text/event-stream"},
                                          content=stream_of("fine")))[1])
        await warm(client, relay)
        r, took = await timed(client, "POST", "/v1/chat/completions",
                              json={**body, "stream": True}, headers=alice.headers)
        assert r.status_code == 200 and took < WITHIN
        assert r.content.endswith(b"data: " + json.dumps(UNAVAILABLE, separators=(
            ",", ":")).encode() + b"\n\n")
        await warm(client, relay)
    assert await db.fetchval("SELECT count(*) FROM chat_messages WHERE session_id = $1", sid) == 0


def stream_of(text: str) -> bytes:
    delta = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}}]}
    return b"data: " + json.dumps(delta).encode() + b"\n\ndata: [DONE]\n\n"


async def test_bulk_work_gets_its_own_longer_statement_timeout(
    settings: Settings, alice: User, db: asyncpg.Connection
) -> None:
    # A statement that outlives the request timeout fails a request but not a bulk operation:
    # a lock held by another transaction stands in for a merge of a very large session.
    short = configured(settings, db_statement_timeout=0.5, db_bulk_timeout=30)
    async with app_client(short) as client:
        sid = await new_session(client, alice)
        other = await new_session(client, alice)
        lock = await asyncpg.connect(settings.database_url)
        try:
            tx = lock.transaction()
            await tx.start()
            await lock.execute("SELECT 1 FROM chat_sessions WHERE id = $1 FOR UPDATE", sid)
            patch = asyncio.ensure_future(client.patch(
                f"/v1/chat/sessions/{sid}", json={"session_name": "x"}, headers=alice.headers))
            merge = asyncio.ensure_future(client.post(
                f"/v1/chat/sessions/{sid}/merge", json={"source_session_id": other},
                headers=alice.headers))
            r = await patch  # the request's statement gave up after half a second
            assert (r.status_code, r.json()) == (503, UNAVAILABLE)
            await asyncio.sleep(0.6)  # the merge waits past the request timeout ...
            assert not merge.done()
            await tx.rollback()
            r = await merge  # ... and completes once the lock is gone
            assert r.status_code == 200, r.text
        finally:
            await lock.close()


# --- SIGSTOP under a live server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateCluster]:
    private = PrivateCluster(tmp_path_factory.mktemp("hungpg"))
    yield private
    if private.running():
        private.stop()


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_a_stopped_database_under_a_live_server_is_503_within_seconds(
    cluster: PrivateCluster, tmp_path: Path
) -> None:
    url = cluster.url
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        user = await make_user(conn)
    finally:
        await conn.close()
    with FakeUpstream() as fake:
        server = Serve(serve_env(url, fake.base_url, tmp_path), tmp_path / "serve.log").start()
        try:
            outcome = await asyncio.to_thread(stopped_then_resumed, server.url, user, cluster)
        finally:
            server.stop()
    for what, status, took in outcome["stopped"]:
        assert (what, status) == (what, 503)
        assert took < WITHIN, (what, took)
    assert outcome["resumed"] == [200, 200]


def stopped_then_resumed(url: str, user: User, cluster: PrivateCluster) -> dict[str, Any]:
    with httpx.Client(base_url=url, headers=user.headers, timeout=90) as http:
        sid = http.post("/v1/chat/sessions", json={}).json()["id"]
        chat = {"model": "echo", "session_id": sid,
                "messages": [{"role": "user", "content": "hi"}]}
        stopped = []
        with cluster.frozen():
            for what, call in (
                ("session", lambda: http.get(f"/v1/chat/sessions/{sid}")),
                ("turn", lambda: http.post("/v1/chat/completions", json=chat)),
                ("list", lambda: http.get("/v1/chat/sessions")),
            ):
                started = time.monotonic()
                r = call()
                stopped.append((what, r.status_code, time.monotonic() - started))
        deadline = time.monotonic() + 30
        while http.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        resumed = [http.get(f"/v1/chat/sessions/{sid}").status_code,
                   http.post("/v1/chat/completions", json=chat).status_code]
    return {"stopped": stopped, "resumed": resumed}
