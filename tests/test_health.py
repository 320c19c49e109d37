"""`/health` and `/ready`: ready while the database answers, 503 when it is gone or hangs.

The database is real throughout. "Gone" is a database dropped under a running app; "hangs" is the
app's connections running through a TCP relay that stops passing bytes, as a frozen server or a
black-holed network would.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from proxy.app import create_app
from tests.conftest import User, configured, fresh_database, make_user

UNAVAILABLE = {"error": {"message": "The database is unavailable, try again shortly",
                         "type": "server_error", "param": None, "code": "database_unavailable"}}


async def test_health_and_ready(client) -> None:
    r = await client.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    r = await client.get("/ready")
    assert (r.status_code, r.json()) == (200, {"status": "ready"})


@pytest.fixture
async def doomed_database(
    server_url: str,
) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    """A migrated database of this test's own, and a server connection that can drop it."""
    async with fresh_database(server_url, "chatproxy_doomed_") as url:
        admin = await asyncpg.connect(server_url)
        try:
            yield url, admin
        finally:
            await admin.close()


async def test_ready_is_503_once_the_database_is_dropped(settings, doomed_database) -> None:
    url, admin = doomed_database
    conn = await asyncpg.connect(url)
    try:
        user = await make_user(conn)
    finally:
        await conn.close()
    app = create_app(configured(settings, database_url=url))
    async with AsyncTestClient(app=app) as client:
        r = await client.get("/ready")
        assert (r.status_code, r.json()) == (200, {"status": "ready"})
        sid = (await client.post("/v1/chat/sessions", headers=user.headers)).json()["id"]

        name = urlsplit(url).path.lstrip("/")
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

        r = await client.get("/ready")
        assert (r.status_code, r.json()) == (503, UNAVAILABLE)
        r = await client.get("/health")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        await assert_sessions_fail_closed(client, user, sid)


async def assert_sessions_fail_closed(client: AsyncTestClient[Any], user: User, sid: str) -> None:
    for method, path in (("GET", "/v1/chat/sessions"), ("POST", "/v1/chat/sessions"),
                         ("GET", f"/v1/chat/sessions/{sid}"),
                         ("GET", f"/chat/sessions/{sid}/messages")):
        r = await client.request(method, path, headers=user.headers)
        assert (method, path, r.status_code, r.json()) == (method, path, 503, UNAVAILABLE)
    # A malformed key is refused before the database is asked.
    r = await client.get("/v1/chat/sessions", headers={"Authorization": "Bearer sk-cp-short"})
    assert r.status_code == 401


# --- a relay that can stop passing bytes ---------------------------------------------------------


class Relay:
    """A TCP relay in front of PostgreSQL, on its own thread and event loop.

    The app under test runs on the test client's thread; the relay must keep serving while the
    test's own loop is blocked in a request, hence the thread.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or "localhost"])[0]
        port = parts.port or int(query.get("port", ["5432"])[0])
        self._target: tuple[str, int] | str = (
            f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
        )
        self._parts = parts
        self._flowing = threading.Event()
        self._flowing.set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def url(self) -> str:
        user = self._parts.username or "postgres"
        password = f":{self._parts.password}" if self._parts.password else ""
        netloc = f"{user}{password}@127.0.0.1:{self.port}"
        return urlunsplit(("postgresql", netloc, self._parts.path, "", ""))

    def __enter__(self) -> Relay:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self._flowing.set()
        self._call(self._close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def stall(self) -> None:
        """Keep every connection open, pass nothing: a hung database."""
        self._flowing.clear()

    def resume(self) -> None:
        """Cut the stalled connections (as a restarted server would) and pass bytes again."""
        self._call(self._drop_connections())
        self._flowing.set()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if isinstance(self._target, str):
            up_reader, up_writer = await asyncio.open_unix_connection(self._target)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                while not self._flowing.is_set():
                    await asyncio.sleep(0.01)
                    if writer.is_closing():
                        return
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def _drop_connections(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _close_all(self) -> None:
        self._server.close()
        await self._drop_connections()


@pytest.fixture
def relay(database_url: str) -> Iterator[Relay]:
    with Relay(database_url) as running:
        yield running


@pytest.mark.timeout(60)  # a /ready that hangs fails here instead of holding up the run
async def test_ready_is_503_when_the_database_hangs_then_recovers(
    settings, relay: Relay, alice: User
) -> None:
    app = create_app(configured(settings, database_url=relay.url(), db_acquire_timeout=1.0))
    async with AsyncTestClient(app=app) as client:
        r = await client.get("/ready")
        assert (r.status_code, r.json()) == (200, {"status": "ready"})
        sid = (await client.post("/v1/chat/sessions", headers=alice.headers)).json()["id"]

        relay.stall()
        r = await client.get("/ready")
        assert (r.status_code, r.json()) == (503, UNAVAILABLE)
        r = await client.get("/health")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})

        relay.resume()
        # The same app, no restart: the pool replaces the cut connections on its own.
        r = await client.get("/ready")
        assert (r.status_code, r.json()) == (200, {"status": "ready"})
        r = await client.get(f"/v1/chat/sessions/{sid}", headers=alice.headers)
        assert (r.status_code, r.json()["id"]) == (200, sid)
