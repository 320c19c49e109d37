"""`chatproxy serve`'s server: uvicorn's, with guarded connections and a shutdown of its own.

Left alone, uvicorn waits for a request head as long as a client likes (its keep-alive timer
stops at a connection's first byte), parses a head of any size, and caps requests, not
connections (`limit_concurrency` answers plain text once a head is in). So a client could hold
sockets open without a word, one byte at a time, or with a 16 MB header, until the process ran
out of files. `GuardedProtocol` reads its limits from uvicorn's settings (`uvicorn_options`):

- `timeout_keep_alive` = `CHATPROXY_HEAD_TIMEOUT`: a connection must send a whole request head
  within this many seconds of opening, or of its previous response. One that sent nothing is
  closed (as an idle keep-alive connection always was); one that sent part of a head gets 408.
  The timer is uvicorn's keep-alive timer, left running until the head is complete instead of
  stopped at its first byte, so a request costs no more timers than before.
- `h11_max_incomplete_event_size` = `CHATPROXY_MAX_HEAD_BYTES`: a head larger than this gets 431
  before any more of it is parsed.
- `limit_concurrency` = `CHATPROXY_MAX_CONNECTIONS`: a connection beyond this many open ones in
  the process gets 503 at once (and uvicorn's own per-request check is off).
- `send_timeout` = `CHATPROXY_SEND_TIMEOUT`: a response whose client reads nothing for this
  long (the socket's buffers full, writing paused all along) is cut: the connection is aborted,
  and the app sees the client gone. A slow reader is never what holds a response's resources
  (an export's spool, a stream's upstream) for ever.

Each refusal is OpenAI's error envelope with `connection: close`. The connection then reads and
drops what the client still sends, for at most `LINGER_SECONDS`, so that the client reads the
answer instead of a reset, and closes.

`Server` (uvicorn's, in every worker: `run`) shuts down as the README says: on SIGTERM or
Ctrl-C it stops accepting, lets what runs finish within `timeout_graceful_shutdown`
(`CHATPROXY_SHUTDOWN_GRACE`), or until a second Ctrl-C; then it cancels what still runs, with
`errors.SHUTDOWN_CUT`, so that a request waiting for the upstream is answered 503 and a stream
is cut with what had arrived stored as incomplete (one warning line each, proxy/logs.py), waits
for those to unwind, and always runs the app's own shutdown, which waits for their writes
before it closes the pool. uvicorn's would log an error line of its own at the deadline, and on
a second Ctrl-C skip the app's shutdown, leaving the writes to die with the event loop.
"""

from __future__ import annotations

import asyncio
import http
import logging
import resource
from functools import partial
from typing import Any

import httptools
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import multiprocess

from proxy.config import Settings
from proxy.errors import (
    SHUTDOWN_CUT,
    BadRequest,
    HeaderTooLarge,
    ProxyError,
    RequestTimeout,
    TooManyConnections,
    error_bytes,
)

log = logging.getLogger("chatproxy")
uvicorn_log = logging.getLogger("uvicorn.error")  # the server's own lines, as uvicorn's

LINGER_SECONDS = 2.0
UNWIND_SECONDS = 10.0  # for the requests cut at the deadline to hand their writes over
DEFAULT_MAX_HEAD = 64 * 1024
FILES_IN_RESERVE = 64  # for the pool, the logs, PostgreSQL's socket, ...


class GuardedProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, send_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.send_timeout = send_timeout
        self.stalled: asyncio.TimerHandle | None = None  # armed while writing is paused
        self.max_connections: int | None = self.limit_concurrency
        self.limit_concurrency = None  # the cap is on connections, in connection_made
        self.max_head: int = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_HEAD
        self.head_bytes = 0  # of the request head being read
        self.reading_head = True  # no whole head since the last request ended
        self.refused = False
        self.linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            self.transport = transport
            self._refuse(TooManyConnections())
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.linger is not None:
            self.linger.cancel()
        if self.stalled is not None:
            self.stalled.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        # The client reads less than the response sends: it gets `send_timeout` to take some.
        super().pause_writing()
        if self.send_timeout is not None and self.stalled is None:
            self.stalled = self.loop.call_later(self.send_timeout, self._stalled)

    def resume_writing(self) -> None:
        if self.stalled is not None:
            self.stalled.cancel()
            self.stalled = None
        super().resume_writing()

    def _stalled(self) -> None:
        # Aborted, not closed: a close would wait for the buffer to drain, which it never will.
        # The app sees the client gone (`http.disconnect`) and ends the response.
        self.stalled = None
        log.info("a client that read nothing for %g s was disconnected", self.send_timeout)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        # Not uvicorn's: it stops the keep-alive timer at every byte; here the head's timer
        # runs until the head is whole (on_headers_complete).
        if self.refused:
            return  # read and dropped until the connection closes
        while self.reading_head and data:
            room = self.max_head - self.head_bytes
            part, data = data[:room], data[room:]
            self.head_bytes += len(part)
            self._feed(part)
            if self.refused:
                return
            if self.reading_head and self.head_bytes >= self.max_head:
                self._refuse(HeaderTooLarge())
                return
        if data:
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            self._refuse(BadRequest("Invalid HTTP request"))

    def on_headers_complete(self) -> None:
        self.reading_head = False
        self._unset_keepalive_if_required()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.reading_head = True  # the next request's head, if any, starts now
        self.head_bytes = 0

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        if self.transport.is_closing() or not self.reading_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered
        if self.head_bytes:
            self._refuse(RequestTimeout())
        else:
            self.transport.close()

    def _arm(self) -> None:
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def _refuse(self, error: ProxyError) -> None:
        """Answer `error` and close, unless a response is under way (then just close)."""
        self.refused = True
        self._unset_keepalive_if_required()
        transport = self.transport
        if self.cycle is not None and not self.cycle.response_complete:
            transport.close()
            return
        transport.write(_answer(error))
        if transport.can_write_eof():
            transport.write_eof()  # the client reads the answer, then its end
        self.linger = self.loop.call_later(LINGER_SECONDS, transport.close)


def _answer(error: ProxyError) -> bytes:
    body = error_bytes(error)
    phrase = http.HTTPStatus(error.status).phrase
    return (
        f"HTTP/1.1 {error.status} {phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode("latin-1") + body


def max_connections(settings: Settings) -> int:
    """`max_connections`, within what the open-files limit allows: each open stream holds two
    sockets (the client's and the upstream's), and some files are needed besides."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    allowed = max(1, (soft - FILES_IN_RESERVE) // 2)
    if settings.max_connections > allowed:
        log.warning("CHATPROXY_MAX_CONNECTIONS lowered from %d to %d: the open files limit is %d",
                    settings.max_connections, allowed, soft)
        return allowed
    return settings.max_connections


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What `chatproxy serve` gives uvicorn for the guards above."""
    return {
        "http": partial(GuardedProtocol, send_timeout=settings.send_timeout),
        "timeout_keep_alive": settings.head_timeout,
        "h11_max_incomplete_event_size": settings.max_head_bytes,
        "limit_concurrency": max_connections(settings),
    }


# --- the shutdown -----------------------------------------------------------------------------


class Server(uvicorn.Server):
    """uvicorn's server with the shutdown of the module's docstring."""

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        uvicorn_log.info("Shutting down")
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.timeout_graceful_shutdown or 0)
        if self.server_state.connections and not self.force_exit:
            uvicorn_log.info("Waiting for connections to close. (CTRL+C to force quit)")
        # Polled, as uvicorn does: its state has no event to wait on.
        while (self.server_state.connections or self.server_state.tasks) and (  # noqa: ASYNC110
            not self.force_exit and loop.time() < deadline
        ):
            await asyncio.sleep(0.1)
        running = list(self.server_state.tasks)
        for task in running:
            task.cancel(msg=SHUTDOWN_CUT)
        if running:
            await asyncio.wait(running, timeout=UNWIND_SECONDS)
        await self.lifespan.shutdown()  # however it got here: it waits for the writes


class _Worker(multiprocess.Process):
    """A worker process of `--workers N`, whose server is `Server`."""

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = Server(config=self.config)
        return self._server


def run(config: uvicorn.Config) -> None:
    """Serve `config` (an app given as an import string) as `uvicorn.run` would, on `Server`."""
    if config.workers > 1:
        # uvicorn's supervisor makes each worker (at start, and anew when one dies, on SIGHUP or
        # SIGTTIN) from its module's `Process`, whose server would be uvicorn's own: it makes
        # ours instead. Supervising is all this process does from here on.
        multiprocess.Process = _Worker  # type: ignore[misc]
        multiprocess.Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server = Server(config=config)
    server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)
