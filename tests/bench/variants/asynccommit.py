"""Variant: the shipped server with `synchronous_commit = off` on the proxy's connections.

For measurement only: it shows what waiting for the WAL flush of each turn's commit costs.
It is not a proposal: with it, a turn the client was answered for can be lost if PostgreSQL
itself crashes within about 3 x wal_writer_delay (the data stays consistent).
"""

from __future__ import annotations

import functools

import _base
import asyncpg

if __name__ == "__main__":
    asyncpg.connect = functools.partial(
        asyncpg.connect, server_settings={"synchronous_commit": "off"})
    _base.serve()
