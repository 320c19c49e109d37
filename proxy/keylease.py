"""The client keys this process verified: answered without the database, revocation still at once.

A client key is checked against the database, one round trip before anything else can happen.
This process keeps the keys it verified instead, and trusts them only under a lease that proves
it has heard of every change to `api_keys` committed up to less than `LEASE` seconds ago:

- Every change to `api_keys` notifies the channel `chatproxy_keys` (the trigger of
  sql/004_key_changes.sql). The feed, one connection per process listening on it, moves the
  cache's generation on when that arrives: no key verified before is trusted any more.
- The feed also sends a notification ("a beat") to a channel of its own and notes when it sent
  it. PostgreSQL delivers notifications to a listener in the order their transactions committed,
  so when the beat comes back, every change committed before it was sent has come first. The
  cache is trusted until `LEASE` seconds after the newest returned beat was sent.
- A revocation through the CLI or the admin API returns `REVOKE_WAIT` (> `LEASE`) seconds after
  its commit (`settle`). A request that begins later can only be answered from a cache whose
  lease a beat sent after that commit renewed, so the generation had moved on first: the key is
  refused from the next request on, as without the cache.
- A key verified by a query that raced a change is not trusted: `remember` takes the generation
  read before the query.
- While the feed is down or not yet listening, the lease lapses and every key goes to the
  database. On each (re)connection the generation moves on once listening, since changes made
  while nobody listened were never heard.

The same table serves while the database is down (`recent`). A request that stores nothing (a
chat completion without `session_id`, a passthrough route) should still pass then (contract §4
fails closed for session requests only), so it is accepted for a key confirmed within the last
`OUTAGE_TTL` seconds, by the database or by a trusted lookup; any other key gets the 503. A key
revoked within that window before an outage may pass for the rest of it, and no longer.

Beats run only while keys are asked for: every `BEAT` seconds, until `ACTIVE` seconds after the
last lookup. Only SHA-256 hashes are held, in memory, never a key; the table is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from proxy import db
from proxy.store import database

log = logging.getLogger("chatproxy.keys")

CHANNEL = "chatproxy_keys"
LEASE = 1.0  # seconds a returned beat makes the cache trusted for, from when it was sent
REVOKE_WAIT = LEASE + 0.2  # what a revocation waits after its commit (> LEASE, with a margin)
BEAT = 0.25  # seconds between beats while keys are asked for
ACTIVE = 60.0  # beats stop this long after the last lookup
RETRY = 1.0  # seconds between attempts to (re)connect the feed
BEAT_TIMEOUT = 5.0
MAX_ENTRIES = 10_000
OUTAGE_TTL = 120.0  # seconds a confirmed key still passes while the database is down
FEED_NAME = "chatproxy key feed"  # its application_name in pg_stat_activity


@dataclass(slots=True)
class _Entry:
    user_id: str
    confirmed: float  # when the key was last known valid (this lease's clock)
    generation: int  # the cache's generation when the database confirmed it


class KeyLease:
    """key hash -> the user the database confirmed it for; trusted while the lease runs."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ENTRIES,
        ttl: float = OUTAGE_TTL,
    ) -> None:
        self._clock = clock
        self._max = max_entries
        self._ttl = ttl
        self._entries: dict[bytes, _Entry] = {}  # oldest confirmation first
        self._trusted_until = 0.0
        self._asked_at = -ACTIVE
        self.asked = asyncio.Event()  # set by a lookup; the feed waits on it while idle
        self.generation = 0  # moves on with every change

    def user(self, key_hash: bytes) -> str | None:
        """The key's user when the lease vouches for it now; else None: ask the database."""
        now = self._clock()
        self._asked_at = now
        self.asked.set()
        if now >= self._trusted_until:
            return None
        entry = self._entries.get(key_hash)
        if entry is None or entry.generation != self.generation:
            return None
        entry.confirmed = self._trusted_until - LEASE  # valid when the last beat was sent
        return entry.user_id

    def remember(self, key_hash: bytes, user_id: str, generation: int) -> None:
        """The database confirmed this key by a query begun at `generation`."""
        self._entries.pop(key_hash, None)  # re-inserted last: the table stays oldest-first
        self._entries[key_hash] = _Entry(user_id, self._clock(), generation)
        while len(self._entries) > self._max:
            del self._entries[next(iter(self._entries))]

    def forget(self, key_hash: bytes) -> None:
        """The database refused this key (unknown or revoked)."""
        self._entries.pop(key_hash, None)

    def recent(self, key_hash: bytes) -> str | None:
        """While the database is down: the key's user if confirmed within the outage ttl."""
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        if self._clock() - entry.confirmed > self._ttl:
            del self._entries[key_hash]
            return None
        return entry.user_id

    def changed(self) -> None:
        """Some key changed (or may have, unheard): trust no key verified before."""
        self.generation += 1

    def confirmed(self, sent: float) -> None:
        """A beat sent at `sent` (this lease's clock) came back."""
        self._trusted_until = max(self._trusted_until, sent + LEASE)

    def lapse(self) -> None:
        """The feed is gone: trust nothing until it is back."""
        self._trusted_until = 0.0
        self.changed()

    def wanted(self) -> bool:
        """Whether keys were asked for lately (the feed beats only then)."""
        return self._clock() - self._asked_at < ACTIVE

    def now(self) -> float:
        return self._clock()


async def settle() -> None:
    """After a revocation committed: wait until no server can still trust its cache of the key."""
    await asyncio.sleep(REVOKE_WAIT)


async def follow(lease: KeyLease, url: str) -> None:
    """The process's feed, until cancelled: connects, listens, and beats while keys are asked."""
    while True:
        try:
            conn = await asyncpg.connect(
                url, timeout=db.CONNECT_TIMEOUT,
                # A beat's commit needs no flush to disk: it stores nothing.
                server_settings={"synchronous_commit": "off", "application_name": FEED_NAME},
            )
        except (*db.UNAVAILABLE, asyncpg.PostgresError):
            await asyncio.sleep(RETRY)
            continue
        try:
            await _listen(lease, conn)
        except (*db.UNAVAILABLE, asyncpg.PostgresError) as exc:
            log.warning("key feed lost its database connection (%s); every key is checked "
                        "against the database until it is back", type(exc).__name__)
        finally:
            lease.lapse()
            conn.terminate()
        await asyncio.sleep(RETRY)


async def _listen(lease: KeyLease, conn: asyncpg.Connection) -> None:
    channel = f"chatproxy_beat_{os.getpid()}_{secrets.token_hex(4)}"
    sent: dict[int, float] = {}

    def on_change(*_: object) -> None:
        lease.changed()

    def on_beat(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        number = int(payload)
        at = sent.get(number)
        for older in [n for n in sent if n <= number]:
            del sent[older]  # delivered in order: an earlier beat that is not back never will be
        if at is not None:
            lease.confirmed(at)

    await conn.add_listener(CHANNEL, on_change)
    await conn.add_listener(channel, on_beat)
    lease.changed()  # what changed while nobody listened was never heard
    number = 0
    while True:
        if not lease.wanted():
            lease.asked.clear()
            await lease.asked.wait()
        number += 1
        sent[number] = lease.now()
        await database.notify(conn, channel, str(number), timeout=BEAT_TIMEOUT)
        await asyncio.sleep(BEAT)
