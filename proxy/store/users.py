"""`users` and `api_keys`: creating and finding users, issuing, listing and revoking keys.

Rows become plain dicts; a key's secret is never stored, only its SHA-256 hash and a short
display prefix (proxy/auth.py makes both).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from proxy.ids import new_id
from proxy.timefmt import iso


def _user(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "created_at": iso(row["created_at"])}


async def create_user(conn: asyncpg.Connection, name: str) -> dict[str, Any] | None:
    """The new user, or None when the name is taken."""
    row = await conn.fetchrow(
        "INSERT INTO users (id, name) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING "
        "RETURNING id, name, created_at",
        new_id("user_"),
        name,
    )
    return _user(row) if row else None


async def list_users(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT id, name, created_at FROM users ORDER BY created_at, id")
    return [_user(r) for r in rows]


async def find_user(conn: asyncpg.Connection, name_or_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT id, name, created_at FROM users WHERE id = $1 OR name = $1 "
        "ORDER BY (id = $1) DESC LIMIT 1",
        name_or_id,
    )
    return _user(row) if row else None


def _key(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "api_key",
        "user_id": row["user_id"],
        "prefix": row["prefix"],
        "name": row["name"],
        "created_at": iso(row["created_at"]),
        "revoked_at": iso(row["revoked_at"]),
    }


async def create_key(
    conn: asyncpg.Connection, user_id: str, key_hash: bytes, prefix: str, name: str | None
) -> dict[str, Any] | None:
    """The new key's row (without the secret), or None when the user does not exist."""
    row = await conn.fetchrow(
        "INSERT INTO api_keys (id, user_id, key_hash, prefix, name) "
        "SELECT $1, id, $3, $4, $5 FROM users WHERE id = $2 "
        "RETURNING id, user_id, prefix, name, created_at, revoked_at",
        new_id("key_"),
        user_id,
        key_hash,
        prefix,
        name,
    )
    return _key(row) if row else None


async def list_keys(conn: asyncpg.Connection, user_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, user_id, prefix, name, created_at, revoked_at FROM api_keys "
        "WHERE user_id = $1 ORDER BY created_at, id",
        user_id,
    )
    return [_key(r) for r in rows]


async def revoke_key(conn: asyncpg.Connection, key_id: str) -> bool:
    """True when the key exists (revoking twice is harmless)."""
    row = await conn.fetchrow(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 RETURNING id",
        key_id,
    )
    return row is not None


async def user_for_key(conn: asyncpg.Connection, key_hash: bytes) -> str | None:
    user_id: str | None = await conn.fetchval(
        "SELECT user_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", key_hash
    )
    return user_id
