"""The key lease (proxy/keylease.py): keys answered without the database, revocation still at once.

The lease's rules with a hand-driven clock; the feed against the real PostgreSQL (the trigger of
sql/004_key_changes.sql, the beats, a lost connection); and the server: a cached key is refused
on the very next request after the admin API's revocation returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from proxy import auth, keylease
from proxy.keylease import KeyLease
from proxy.store import users
from tests.conftest import User, fresh_database, make_user, until_key_cached

HASH_A = b"a" * 32
HASH_B = b"b" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nothing_is_trusted_before_a_beat_came_back() -> None:
    clock = Clock()
    lease = KeyLease(clock=clock)
    lease.remember(HASH_A, "user_a", lease.generation)
    assert lease.user(HASH_A) is None
    lease.confirmed(sent=clock.now)
    assert lease.user(HASH_A) == "user_a"
    assert lease.user(HASH_B) is None  # only what the database confirmed


def test_the_lease_runs_from_when_the_beat_was_sent() -> None:
    clock = Clock()
    lease = KeyLease(clock=clock)
    lease.remember(HASH_A, "user_a", lease.generation)
    lease.confirmed(sent=clock.now - 0.4)  # a beat that took 0.4 s to come back
    clock.now += keylease.LEASE - 0.5
    assert lease.user(HASH_A) == "user_a"
    clock.now += 0.1  # LEASE seconds after the beat was sent
    assert lease.user(HASH_A) is None
    lease.confirmed(sent=clock.now - 2 * keylease.LEASE)  # an old beat renews nothing
    assert lease.user(HASH_A) is None
    assert keylease.REVOKE_WAIT > keylease.LEASE


def test_a_change_forgets_every_key_and_a_racing_query_keeps_nothing() -> None:
    clock = Clock()
    lease = KeyLease(clock=clock)
    lease.confirmed(sent=clock.now)
    lease.remember(HASH_A, "user_a", lease.generation)
    before_query = lease.generation
    lease.changed()  # a revocation's notification arrived while a query was running
    assert lease.user(HASH_A) is None
    assert lease.recent(HASH_A) == "user_a"  # still confirmed enough for a database outage
    lease.remember(HASH_B, "user_b", before_query)
    assert lease.user(HASH_B) is None
    lease.remember(HASH_B, "user_b", lease.generation)
    assert lease.user(HASH_B) == "user_b"


def test_lapse_trusts_nothing_until_the_next_beat() -> None:
    clock = Clock()
    lease = KeyLease(clock=clock)
    lease.confirmed(sent=clock.now)
    lease.remember(HASH_A, "user_a", lease.generation)
    lease.lapse()
    assert lease.user(HASH_A) is None
    lease.confirmed(sent=clock.now)
    assert lease.user(HASH_A) is None  # verified before the lapse: not trusted again


def test_the_table_is_bounded_and_beats_stop_when_nobody_asks() -> None:
    clock = Clock()
    lease = KeyLease(clock=clock, max_entries=2)
    lease.confirmed(sent=clock.now)
    for n in range(3):
        lease.remember(bytes([n]) * 32, f"user_{n}", lease.generation)
    assert [lease.user(bytes([n]) * 32) for n in range(3)] == [None, "user_1", "user_2"]
    assert lease.wanted()
    clock.now += keylease.ACTIVE
    assert not lease.wanted()


# --- the feed, on the real database -----------------------------------------------------------


@asynccontextmanager
async def feed(url: str) -> AsyncIterator[KeyLease]:
    lease = KeyLease()
    task = asyncio.create_task(keylease.follow(lease, url))
    try:
        yield lease
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until(check: Callable[[], Any], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def cached(lease: KeyLease, user: User) -> Callable[[], bool]:
    """A check that verifies `user`'s key as a request would, then asks the cache."""
    key_hash = auth.hash_key(user.key)

    def check() -> bool:
        lease.remember(key_hash, user.id, lease.generation)
        return lease.user(key_hash) == user.id

    return check


async def test_a_revocation_empties_the_cache_before_it_returns(
    database_url: str, db: asyncpg.Connection
) -> None:
    user, other = await make_user(db), await make_user(db)
    async with feed(database_url) as lease:
        await until(cached(lease, user))
        assert await users.revoke_key(db, user.key_id)
        await keylease.settle()
        assert lease.user(auth.hash_key(user.key)) is None
        # Any change to api_keys (here one made by hand) empties it, for every key.
        await until(cached(lease, other))
        await db.execute("UPDATE api_keys SET name = name WHERE id = $1", other.key_id)
        await until(lambda: lease.user(auth.hash_key(other.key)) is None, within=2)


async def test_without_the_notification_the_lease_would_keep_a_revoked_key(
    server_url: str,
) -> None:
    """The check above can fail: with the trigger off, the cache outlives the revocation."""
    async with fresh_database(server_url) as url:
        conn = await asyncpg.connect(url)
        try:
            user = await make_user(conn)
            async with feed(url) as lease:
                await until(cached(lease, user))
                await conn.execute("ALTER TABLE api_keys DISABLE TRIGGER api_keys_changed")
                assert await users.revoke_key(conn, user.key_id)
                await keylease.settle()
                assert lease.user(auth.hash_key(user.key)) == user.id
        finally:
            await conn.close()


async def test_a_lost_feed_trusts_nothing_until_it_is_back(
    database_url: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    user, unheard = await make_user(db), await make_user(db)
    key_hash = auth.hash_key(user.key)
    async with feed(database_url) as lease:
        await until(cached(lease, user))
        with caplog.at_level(logging.WARNING, logger="chatproxy.keys"):
            killed = await db.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1 AND datname = current_database()",
                keylease.FEED_NAME,
            )
            assert killed == 1
            await until(lambda: lease.user(key_hash) is None, within=3)
        assert "key feed lost its database connection" in caplog.text
        # While nobody listens, a request verifies a key, which is then revoked unheard.
        lease.remember(auth.hash_key(unheard.key), unheard.id, lease.generation)
        assert await users.revoke_key(db, unheard.key_id)
        await until(cached(lease, user))  # reconnected and beating again
        assert lease.user(auth.hash_key(unheard.key)) is None


# --- the server ------------------------------------------------------------------------------


async def test_a_cached_key_is_refused_on_the_request_after_the_revocation(
    client: Any, admin_headers: dict[str, str], alice: User
) -> None:
    await until_key_cached(client, alice.key)
    began = asyncio.get_running_loop().time()
    revoked = await client.delete(f"/admin/keys/{alice.key_id}", headers=admin_headers)
    assert revoked.status_code == 204
    # It answers only once no process can still trust a copy (a wait, not a speed).
    assert asyncio.get_running_loop().time() - began >= keylease.REVOKE_WAIT
    refused = await client.get("/v1/chat/sessions", headers=alice.headers)
    assert refused.status_code == 401
