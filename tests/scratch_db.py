"""A private, migrated database on the test server, for tests that need to own every row
(the retention job and `chatproxy cleanup` act on the whole database)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from proxy.migrate import migrate
from tests.conftest import with_database


@asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    name = "chatproxy_scratch_" + secrets.token_hex(4)
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = with_database(server_url, name)
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
