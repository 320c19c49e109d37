"""`/health` and `/ready`: ready while the database answers, 503 when it is gone or hangs.

The database is real throughout. "Gone" is a database dropped under a running app; "hangs" is the
app's connections running through a TCP relay that stops passing bytes, as a frozen server or a
black-holed network would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from proxy.app import create_app
from tests.conftest import User, configured, fresh_database, make_user
from tests.fault_helpers import Relay

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
