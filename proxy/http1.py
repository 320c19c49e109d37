"""One HTTP/1.1 connection to an upstream, one exchange at a time: asyncio Protocol, httptools.

Invariants of the exchange in flight (`Connection.begin` starts one):

- The response body is handed over chunk by chunk; past `HIGH_WATER` buffered bytes the socket
  stops being read until the reader catches up. Request bodies respect the socket's write flow
  control (`write` waits for the buffer to drain).
- The response head (status line and header lines, interim 1xx heads included) may be at most
  `MAX_HEAD` bytes: past it the exchange fails and the connection is closed, before an
  unfinished header line can grow in memory.
- Failures are httpx's exceptions: ReadTimeout / WriteTimeout (`wait`), RemoteProtocolError
  (closed early, malformed, or a head too large).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import httptools
import httpx

HIGH_WATER = 256 * 1024  # buffered response bytes at which reading pauses
LOW_WATER = 64 * 1024  # ... and resumes
MAX_HEAD = 64 * 1024  # bytes of response head (status line and header lines) an upstream may send


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a head past MAX_HEAD."""


def _too_large() -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError("The upstream's response head is too large")


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; the state of the exchange in flight lives here."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.drained: asyncio.Future[None] | None = None  # set while writing is paused
        self.fresh_parser = False
        self.begin(False)

    def begin(self, head_only: bool) -> None:
        """Reset for a new exchange on this connection."""
        if self.fresh_parser:  # a HEAD answer left the parser expecting a body
            self.parser = httptools.HttpResponseParser(self)
            self.fresh_parser = False
        self.head_only = head_only
        self.active = True
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.headers_done = False
        self.framed = False  # Content-Length or chunked; otherwise the body ends at EOF
        self.interim = False
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.head_seen = 0  # bytes received while the head is incomplete
        self.head_size = 0  # bytes of header lines parsed
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.active:  # bytes on an idle connection: nothing to match them to
            self.close()
            return
        self.got_bytes = True
        if not self.headers_done:
            self.head_seen += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:  # on_header's _HeadTooLarge arrives wrapped in one
            self.fail(httpx.RemoteProtocolError("The upstream sent a malformed response"))
            self.close()
            return
        if not self.headers_done and self.head_seen > MAX_HEAD:
            # httptools keeps an unfinished header line whole: cut it off here, not at its end
            self.fail(_too_large())
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        if self.active and not self.complete:
            if self.headers_done and not self.framed:
                self.complete = True  # a body delimited by the end of the connection
                self.wake()
            else:
                self.fail(httpx.RemoteProtocolError("The upstream closed the connection"))

    def pause_writing(self) -> None:
        self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD:
            self.fail(_too_large())
            raise _HeadTooLarge
        self.headers.append((name, value))
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue and friends: the real answer follows
            self.interim = True
            self.headers = []
            self.framed = False
            return
        self.status = status
        self.headers_done = True
        if self.head_only or status in (204, 304):
            self.framed = True
        if self.head_only:
            self.fresh_parser = True
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self.wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if not self.head_only:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()
        self.wake()

    # helpers

    def fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def write(self, data: bytes, seconds: float | None) -> None:
        if self.closed or self.transport is None:
            raise httpx.RemoteProtocolError("The upstream closed the connection")
        self.transport.write(data)
        if self.drained is not None:  # the socket's buffer is full: wait for it to drain
            await wait(self.drained, seconds, httpx.WriteTimeout)
            if self.closed:
                raise httpx.RemoteProtocolError("The upstream closed the connection")


def _expire(future: asyncio.Future[None], kind: type[httpx.TimeoutException]) -> None:
    if not future.done():
        future.set_exception(kind("The upstream did not answer in time"))


async def wait(
    future: asyncio.Future[None], seconds: float | None, kind: type[httpx.TimeoutException]
) -> None:
    if seconds is None:
        await future
        return
    handle = asyncio.get_running_loop().call_later(seconds, _expire, future, kind)
    try:
        await future
    finally:
        handle.cancel()


async def send_stream(conn: Connection, stream: Any, chunked: bool,
                       seconds: float | None) -> None:
    """A streamed request body; chunk-encoded when its length was not given."""
    async for piece in stream:
        if not piece:
            continue
        if chunked:
            await conn.write(b"%x\r\n%b\r\n" % (len(piece), piece), seconds)
        else:
            await conn.write(piece, seconds)
        if conn.error is not None:  # the upstream answered (or failed) before the upload ended
            break
    if chunked:
        await conn.write(b"0\r\n\r\n", seconds)
