"""The upstream client's transport: HTTP/1.1 on asyncio Protocols and httptools, under httpx's API.

`httpx.AsyncClient` stays the proxy's upstream library (tests put respx's `MockTransport` in its
place); this replaces only what is underneath it, httpcore's connection pool, whose cost per
request grows with the number of pooled connections. Invariants:

- Idle keep-alive connections are kept per (scheme, host, port), last in first out, at most
  `max_keepalive` per origin and never past `keepalive_expiry` seconds idle. No pool scan:
  taking one is a `pop`, giving one back an `append`.
- A connection goes back to the pool only when its response was read to the end and the
  upstream allowed keep-alive; a response closed before its end (the client went away)
  closes its connection.
- A reused connection that fails before any byte of the answer is retried once on a fresh one,
  when the request body is bytes (a streamed body cannot be replayed).
- Response bodies stream chunk by chunk; past `HIGH_WATER` buffered bytes the socket stops being
  read until the reader catches up. Request bodies respect the socket's write flow control.
- Failures are httpx's exceptions: ConnectTimeout, ConnectError (refused, TLS), ReadTimeout
  (no byte within the read timeout), WriteTimeout, RemoteProtocolError (closed or malformed).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx

HIGH_WATER = 256 * 1024  # buffered response bytes at which reading pauses
LOW_WATER = 64 * 1024  # ... and resumes
Origin = tuple[bytes, str, int]


class _Connection(asyncio.Protocol):
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
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail(httpx.RemoteProtocolError("The upstream sent a malformed response"))
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
            await _wait(self.drained, seconds, httpx.WriteTimeout)
            if self.closed:
                raise httpx.RemoteProtocolError("The upstream closed the connection")


def _expire(future: asyncio.Future[None], kind: type[httpx.TimeoutException]) -> None:
    if not future.done():
        future.set_exception(kind("The upstream did not answer in time"))


async def _wait(
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


class _ResponseStream(httpx.AsyncByteStream):
    """The body of one response, read from its connection as it arrives."""

    def __init__(self, owner: FastTransport, origin: Origin, conn: _Connection,
                 read_timeout: float | None) -> None:
        self.owner = owner
        self.origin = origin
        self.conn: _Connection | None = conn
        self.read_timeout = read_timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self.conn
        if conn is None:
            raise httpx.StreamClosed()
        while True:
            while conn.chunks:
                chunk = conn.chunks.popleft()
                conn.buffered -= len(chunk)
                if conn.paused and conn.buffered < LOW_WATER and conn.transport is not None:
                    conn.paused = False
                    conn.transport.resume_reading()
                yield chunk
            if conn.complete:
                self._finish(conn)
                return
            if conn.error is not None:
                raise conn.error
            conn.waiter = conn.loop.create_future()
            try:
                await _wait(conn.waiter, self.read_timeout, httpx.ReadTimeout)
            finally:
                conn.waiter = None

    def _finish(self, conn: _Connection) -> None:
        """The body was read to its end: the connection may serve the next request."""
        self.conn = None
        conn.active = False
        if conn.keep_alive and not conn.closed and conn.error is None:
            self.owner._release(self.origin, conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if conn.complete and not conn.chunks:
            self.conn = conn
            self._finish(conn)
        else:  # closed before its end: the rest of the answer would poison the connection
            conn.active = False
            conn.close()


class FastTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 for `httpx.AsyncClient`: a LIFO keep-alive pool per origin, no pool scan."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_keepalive: int = 256,
        keepalive_expiry: float = 60.0,
    ) -> None:
        self._ssl = ssl_context
        self._max_keepalive = max_keepalive
        self._expiry = keepalive_expiry
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._closed = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _reuse(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._expiry:
                return conn
            conn.close()
        return None

    def _release(self, origin: Origin, conn: _Connection) -> None:
        idle = self._idle.get(origin)
        if idle is None:
            idle = self._idle[origin] = deque()
        now = conn.loop.time()
        while idle and (idle[0].closed or now - idle[0].idle_since >= self._expiry):
            idle.popleft().close()  # the oldest sit at the left
        if self._closed or len(idle) >= self._max_keepalive:
            conn.close()
            return
        conn.idle_since = now
        idle.append(conn)

    async def _connect(self, origin: Origin, seconds: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = self._ssl_context() if scheme == b"https" else None
        try:
            async with asyncio.timeout(seconds):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), host, port,
                    ssl=tls, server_hostname=host if tls is not None else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout("Timed out connecting to the upstream") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS verification (ssl.SSLError)
            raise httpx.ConnectError(f"Could not connect to the upstream: {exc}") from None
        return conn

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"Unsupported URL scheme {url.scheme!r}")
        port = url.port or (443 if scheme == b"https" else 80)
        origin: Origin = (scheme, url.raw_host.decode("ascii"), port)
        timeouts = request.extensions.get("timeout", {})
        connect_timeout = timeouts.get("connect")
        read_timeout = timeouts.get("read")
        write_timeout = timeouts.get("write")
        method = request.method.encode("ascii")
        head_only = method == b"HEAD"
        lines = [method, b" ", url.raw_path, b" HTTP/1.1\r\n"]
        chunked = False
        for name, value in request.headers.raw:
            lines += (name, b": ", value, b"\r\n")
            if name.lower() == b"transfer-encoding" and value.lower() == b"chunked":
                chunked = True
        lines.append(b"\r\n")
        head = b"".join(lines)
        try:
            body: bytes | None = request.content  # bytes: can be sent again
        except httpx.RequestNotRead:
            body = None

        for attempt in (1, 2):
            conn = self._reuse(origin) if attempt == 1 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin, connect_timeout)
            conn.begin(head_only)
            try:
                if body is not None:
                    await conn.write(head + body, write_timeout)
                else:
                    await conn.write(head, write_timeout)
                    await _send_stream(conn, request.stream, chunked, write_timeout)
                await _wait(conn.head, read_timeout, httpx.ReadTimeout)
            except httpx.RemoteProtocolError:
                conn.close()
                if reused and body is not None and not conn.got_bytes:
                    continue  # a kept-alive connection the upstream had closed: once, fresh
                raise
            except BaseException:
                conn.close()
                raise
            return httpx.Response(
                conn.status,
                headers=conn.headers,
                stream=_ResponseStream(self, origin, conn, read_timeout),
                extensions={"http_version": b"HTTP/1.1"},
            )
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()


async def _send_stream(conn: _Connection, stream: Any, chunked: bool,
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
