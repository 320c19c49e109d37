"""Variant: the pool returns connections without asyncpg's reset query.

asyncpg's default release runs `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
RESET ALL` on every release: one extra round trip per acquire. With a `reset` callback asyncpg
still rolls back an open transaction on release, and does nothing else. The proposal in
proxy/db.py: `asyncpg.create_pool(..., reset=_keep_session)` with
`async def _keep_session(conn): pass` (the code takes no session state: advisory locks are
released explicitly, nothing LISTENs or SETs).
"""

from __future__ import annotations

import functools
from typing import Any

import _base  # puts the project on sys.path
import asyncpg


async def _keep_session(conn: Any) -> None:
    return None


def apply() -> None:
    asyncpg.create_pool = functools.partial(asyncpg.create_pool, reset=_keep_session)


if __name__ == "__main__":
    apply()
    _base.serve()
