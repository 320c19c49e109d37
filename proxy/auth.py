"""Bearer keys: the `sk-cp-` format, SHA-256 hashes, issuing one, and the admin key.

A key is `sk-cp-` + 43 URL-safe base64 characters (32 random bytes). Anything else is refused
before the database is asked. Only the hash and a short display prefix are stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Any

import asyncpg

from proxy.errors import Forbidden, NotFound, Unauthorized
from proxy.store import users

KEY_PREFIX = "sk-cp-"
_KEY_RE = re.compile(r"sk-cp-[A-Za-z0-9_-]{43}")  # used with fullmatch: no trailing "\n"
DISPLAY_PREFIX_LENGTH = 12


def generate_key() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LENGTH]


async def issue_key(
    conn: asyncpg.Connection, user_id: str, name: str | None
) -> dict[str, Any] | None:
    """Create a key for `user_id`; the result is the only place the secret ever appears."""
    key = generate_key()
    row = await users.create_key(conn, user_id, hash_key(key), display_prefix(key), name)
    if row is None:
        return None
    return {**row, "key": key}


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def client_key_hash(header: str | None) -> bytes:
    """The hash to look up for a client's Authorization header; malformed keys stop here (401)."""
    key = bearer(header)
    if key is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer sk-cp-...'")
    if not _KEY_RE.fullmatch(key):
        raise Unauthorized("Invalid API key")
    return hash_key(key)


def check_admin(header: str | None, admin_key: str | None) -> None:
    """Admin routes: 404 when disabled, 401 without a key, 403 for a user key."""
    if admin_key is None:
        raise NotFound("Not found")
    key = bearer(header)
    if key is None:
        raise Unauthorized("Missing admin key")
    if hmac.compare_digest(key.encode(), admin_key.encode()):
        return
    if _KEY_RE.fullmatch(key):
        raise Forbidden("This key cannot use the admin API")
    raise Unauthorized("Invalid admin key")
