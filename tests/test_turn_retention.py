"""A turn on a session the retention job is about to expire keeps it alive."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from proxy import auth, retention
from proxy.store import messages
from tests.conftest import User
from tests.turns import Client, new_session


async def idle_session(client: Client, alice: User, db: asyncpg.Connection) -> str:
    """A session of alice's last active 8 days ago."""
    sid = await new_session(client, alice)
    await db.execute(
        "UPDATE chat_sessions SET updated_at = now() - interval '8 days', "
        "created_at = now() - interval '8 days' WHERE id = $1", sid)
    return sid


async def test_a_turn_read_protects_an_idle_session_from_retention(
    client: Client, alice: User, db: asyncpg.Connection
) -> None:
    sid = await idle_session(client, alice, db)
    # The turn reads its session (and then waits for the upstream) ...
    context = await messages.read_turn(db, auth.hash_key(alice.key), sid, None)
    assert context is not None and context.session_found
    # ... while the job runs with a 7-day retention: the session stays.
    report = await retention.cleanup(
        db, now=datetime.now(UTC), retention=timedelta(days=7), keep=0
    )
    assert report.ran
    assert await db.fetchval("SELECT count(*) FROM chat_sessions WHERE id = $1", sid) == 1


async def test_without_a_turn_the_idle_session_expires(
    client: Client, alice: User, db: asyncpg.Connection
) -> None:
    sid = await idle_session(client, alice, db)
    await retention.cleanup(db, now=datetime.now(UTC), retention=timedelta(days=7), keep=0)
    assert await db.fetchval("SELECT count(*) FROM chat_sessions WHERE id = $1", sid) == 0
