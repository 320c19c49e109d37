"""The upstream client's transport: per-origin pools of HTTP/1.1 connections, under httpx's API.

`httpx.AsyncClient` stays the proxy's upstream library (tests put respx's `MockTransport` in its
place); this replaces only what is underneath it, httpcore's connection pool, whose cost per
request grows with the number of pooled connections. One exchange on one connection is
`proxy/http1.py`. Invariants:

- Each origin (scheme, host, port) is found by one dict lookup, and has its route: straight to
  it, or through an HTTP proxy, which httpx's own transport (httpcore) handles with the same
  limits; and the CAs its certificate is checked against (a CA bundle, or the system's).
- At most `max_connections` requests hold a connection to one origin at once, so at most that
  many connections are open to it (idle ones are only ever opened by one of those). A request
  past the cap waits its turn, first come first served, at most the pool timeout, then fails
  with `httpx.PoolTimeout`. Its place is held until its response body was read or closed.
- Idle keep-alive connections are kept per origin, last in first out, at most `max_keepalive`
  and never past `keepalive_expiry` seconds idle. No pool scan: taking one is a `pop`, giving
  one back an `append`.
- A connection goes back to the pool only when its response was read to the end and the
  upstream allowed keep-alive; a response closed before its end (the client went away)
  closes its connection.
- A reused connection that fails before any byte of the answer is retried once on a fresh one,
  when the request body is bytes (a streamed body cannot be replayed).
- Failures are httpx's exceptions: PoolTimeout (no place under the cap), ConnectTimeout,
  ConnectError (refused, TLS), ReadTimeout, WriteTimeout, RemoteProtocolError (closed, malformed,
  or a response head over `http1.MAX_HEAD`), and through a proxy httpx's ProxyError.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import suppress
from dataclasses import dataclass

import httpx

from proxy.http1 import LOW_WATER, Connection, send_stream, wait

Origin = tuple[bytes, str, int]


@dataclass(frozen=True)
class Route:
    """How to reach an origin: through the HTTP proxy `proxy` (a URL) or straight to it, its
    certificate checked against the CAs in `ca_bundle` (a PEM file) or the system's."""

    proxy: str | None = None
    ca_bundle: str | None = None


def origin_of(url: httpx.URL) -> Origin:
    scheme = url.raw_scheme
    return scheme, url.raw_host.decode("ascii"), url.port or (443 if scheme == b"https" else 80)


class _Origin:
    """One origin's connections: the idle ones, and the places under the cap."""

    __slots__ = ("active", "idle", "ssl", "via", "waiters")

    def __init__(self, ssl_context: ssl.SSLContext | None,
                 via: httpx.AsyncBaseTransport | None) -> None:
        self.ssl = ssl_context  # for https; None: the transport's default context
        self.via = via  # httpx's transport through a proxy, which keeps its own connections
        self.idle: deque[Connection] = deque()  # the oldest at the left
        self.active = 0  # places taken: requests with a connection or about to open one
        self.waiters: deque[asyncio.Future[None]] = deque()  # first in, first given a place


class _ResponseStream(httpx.AsyncByteStream):
    """The body of one response, read from its connection as it arrives. Its origin's place
    under the cap is held until the body was read to its end or closed."""

    def __init__(self, owner: FastTransport, origin: _Origin, conn: Connection,
                 read_timeout: float | None) -> None:
        self.owner = owner
        self.origin = origin
        self.conn: Connection | None = conn
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
                await wait(conn.waiter, self.read_timeout, httpx.ReadTimeout)
            finally:
                conn.waiter = None

    def _finish(self, conn: Connection) -> None:
        """The body was read to its end: the connection may serve the next request."""
        self.conn = None
        conn.active = False
        if conn.keep_alive and not conn.closed and conn.error is None:
            self.owner._keep(self.origin, conn)
        else:
            conn.close()
        self.owner._leave(self.origin)

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
            self.owner._leave(self.origin)


class FastTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 for `httpx.AsyncClient`: a LIFO keep-alive pool per origin, no pool scan.

    `routes` maps an upstream's URL to how its origin is reached; an origin without one is
    reached directly, trusting `ssl_context` (default: the system's CAs). `max_connections`
    caps the connections open to one origin at once (0: no cap); a request that finds no place
    within the pool timeout gets `httpx.PoolTimeout`.
    """

    def __init__(
        self,
        *,
        routes: Mapping[str, Route] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 0,
        max_keepalive: int = 256,
        keepalive_expiry: float = 60.0,
    ) -> None:
        self._ssl = ssl_context
        self._cap = max_connections
        self._max_keepalive = max_keepalive
        self._expiry = keepalive_expiry
        self._origins: dict[Origin, _Origin] = {}
        self._closed = False
        contexts: dict[str, ssl.SSLContext] = {}  # one per CA bundle
        routed: dict[Origin, Route] = {}
        for url, route in (routes or {}).items():
            origin = origin_of(httpx.URL(url))
            if routed.setdefault(origin, route) != route:
                raise ValueError(f"two different routes for the origin of {url}")
            if origin in self._origins:
                continue
            context = None
            if route.ca_bundle is not None:
                context = contexts.get(route.ca_bundle)
                if context is None:
                    context = contexts[route.ca_bundle] = ssl.create_default_context(
                        cafile=route.ca_bundle)
            via = None
            if route.proxy is not None:
                via = httpx.AsyncHTTPTransport(
                    proxy=route.proxy, verify=context or ssl.create_default_context(),
                    trust_env=False, limits=httpx.Limits(
                        max_connections=max_connections or None,
                        max_keepalive_connections=max_keepalive,
                        keepalive_expiry=keepalive_expiry))
            self._origins[origin] = _Origin(context, via)

    def _ssl_context(self, origin: _Origin) -> ssl.SSLContext:
        if origin.ssl is not None:
            return origin.ssl
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _enter(self, origin: _Origin, seconds: float | None) -> None:
        """Take a place under the origin's cap, waiting for one at most `seconds`."""
        if not self._cap or origin.active < self._cap:
            origin.active += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        origin.waiters.append(waiter)
        try:
            await wait(waiter, seconds, httpx.PoolTimeout)
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._leave(origin)  # handed a place just as we gave up: pass it on
            else:
                with suppress(ValueError):
                    origin.waiters.remove(waiter)
            raise

    def _leave(self, origin: _Origin) -> None:
        """Give a place back: to the first request still waiting for one, if any."""
        while origin.waiters:
            waiter = origin.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        origin.active -= 1

    def _reuse(self, origin: _Origin) -> Connection | None:
        idle = origin.idle
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._expiry:
                return conn
            conn.close()
        return None

    def _keep(self, origin: _Origin, conn: Connection) -> None:
        idle = origin.idle
        now = conn.loop.time()
        while idle and (idle[0].closed or now - idle[0].idle_since >= self._expiry):
            idle.popleft().close()  # the oldest sit at the left
        if self._closed or len(idle) >= self._max_keepalive:
            conn.close()
            return
        conn.idle_since = now
        idle.append(conn)

    async def _connect(self, key: Origin, origin: _Origin, seconds: float | None) -> Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        tls = self._ssl_context(origin) if scheme == b"https" else None
        try:
            async with asyncio.timeout(seconds):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop), host, port,
                    ssl=tls, server_hostname=host if tls is not None else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout("Timed out connecting to the upstream") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS verification (ssl.SSLError)
            raise httpx.ConnectError(f"Could not connect to the upstream: {exc}") from None
        return conn

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.raw_scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"Unsupported URL scheme {url.scheme!r}")
        key = origin_of(url)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(None, None)
        elif origin.via is not None:
            return await origin.via.handle_async_request(request)
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

        await self._enter(origin, timeouts.get("pool"))
        try:
            for attempt in (1, 2):
                conn = self._reuse(origin) if attempt == 1 else None
                reused = conn is not None
                if conn is None:
                    conn = await self._connect(key, origin, connect_timeout)
                conn.begin(head_only)
                try:
                    if body is not None:
                        await conn.write(head + body, write_timeout)
                    else:
                        await conn.write(head, write_timeout)
                        await send_stream(conn, request.stream, chunked, write_timeout)
                    await wait(conn.head, read_timeout, httpx.ReadTimeout)
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
        except BaseException:
            self._leave(origin)
            raise

    async def aclose(self) -> None:
        self._closed = True
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().close()
            if origin.via is not None:
                await origin.via.aclose()
        self._origins.clear()
