"""Client keys this process verified against the database moments ago, for when it is down.

A request that stores nothing (a chat completion without `session_id`, a passthrough route)
should still pass while the database is unreachable (contract §4 fails closed for session
requests only). Its key cannot be checked then, so such a request is accepted only when this
process verified the same key against the database within the last `ttl` seconds; any other key
gets the 503. The cache is never consulted while the database answers, so revoking a key takes
effect at once as long as the database is up; a key revoked within `ttl` seconds before an
outage may pass for the rest of that window, and no longer.

Only SHA-256 hashes are held, in memory, never a key; the table is bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable

TTL_SECONDS = 120.0
MAX_ENTRIES = 10_000


class KeyCache:
    """key hash -> (user id, when the database last confirmed it)."""

    def __init__(
        self,
        ttl: float = TTL_SECONDS,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: dict[bytes, tuple[str, float]] = {}

    def remember(self, key_hash: bytes, user_id: str) -> None:
        """The database just confirmed this key."""
        self._entries.pop(key_hash, None)  # re-inserted last: the dict stays oldest-first
        self._entries[key_hash] = (user_id, self._clock())
        while len(self._entries) > self._max:
            del self._entries[next(iter(self._entries))]

    def forget(self, key_hash: bytes) -> None:
        """The database refused this key (unknown or revoked)."""
        self._entries.pop(key_hash, None)

    def recent(self, key_hash: bytes) -> str | None:
        """The user id when the key was confirmed within the ttl, else None."""
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        user_id, confirmed = entry
        if self._clock() - confirmed > self._ttl:
            del self._entries[key_hash]
            return None
        return user_id
