"""Variant: the upstream client is a small HTTP/1.1 client on asyncio and httptools.

A prototype, to measure what replacing httpx/httpcore/anyio/h11 on the hot path is worth.
`proxy.upstream.open_stream` is replaced; the response it returns has what the routes use of
an httpx.Response (`status_code`, `headers.get/items`, `aiter_bytes()`, `aclose()`,
`is_closed`) and raises httpx's exception types, so the routes and `read_body` run unchanged.

Per upstream host: a LIFO of idle keep-alive connections (no scan over the pool), one
`transport.write` per request, the response parsed by httptools in `data_received`, the body
handed over chunk by chunk (reading pauses past 256 KiB buffered), timeouts as loop timers.
A reused connection that dies before any byte of the answer is retried once on a fresh one.
Not handled (a prototype): HTTPS, proxies, `Expect: 100-continue`, HEAD.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import _base  # puts the project on sys.path
import httptools
import httpx

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class Headers:
    """The response headers as (name, value) pairs: `get` (case-insensitive) and `items`."""

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self._items:
            if key.lower() == name:
                return value
        return default

    def items(self) -> list[tuple[str, str]]:
        return self._items


class Conn(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self.begin()

    def begin(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.status = 0
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail(httpx.RemoteProtocolError("malformed response from the upstream"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self.fail(httpx.RemoteProtocolError("the upstream closed the connection"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
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
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self.wake()

    def fail(self, exc: BaseException) -> None:
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


def _expire(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


async def _wait(conn: Conn, future: asyncio.Future[None], seconds: float) -> None:
    handle = conn.loop.call_later(seconds, _expire, future,
                                  httpx.ReadTimeout("the upstream did not answer in time"))
    try:
        await future
    finally:
        handle.cancel()


class Response:
    def __init__(self, conn: Conn, pool: Pool, key: tuple[str, int], read_timeout: float):
        self.conn = conn
        self.pool = pool
        self.key = key
        self.read_timeout = read_timeout
        self.status_code = conn.status
        self.headers = Headers(conn.headers)
        self.is_closed = False

    @property
    def is_redirect(self) -> bool:
        return self.status_code in REDIRECTS and self.headers.get("location") is not None

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        conn = self.conn
        while True:
            while conn.chunks:
                chunk = conn.chunks.popleft()
                conn.buffered -= len(chunk)
                if conn.paused and conn.buffered < LOW_WATER and conn.transport is not None:
                    conn.paused = False
                    conn.transport.resume_reading()
                yield chunk
            if conn.complete:
                return
            if conn.error is not None:
                raise conn.error
            conn.waiter = conn.loop.create_future()
            try:
                await _wait(conn, conn.waiter, self.read_timeout)
            finally:
                conn.waiter = None

    async def aclose(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        conn = self.conn
        if conn.complete and conn.keep_alive and not conn.closed and conn.error is None:
            self.pool.release(self.key, conn)
        else:
            conn.close()


class Pool:
    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], deque[Conn]] = {}

    def release(self, key: tuple[str, int], conn: Conn) -> None:
        self.idle.setdefault(key, deque()).append(conn)

    async def connect(self, key: tuple[str, int], seconds: float) -> Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(seconds):
                _, conn = await loop.create_connection(lambda: Conn(loop), key[0], key[1])
        except TimeoutError:
            raise httpx.ConnectTimeout("connect timeout") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from None
        return conn

    def reuse(self, key: tuple[str, int]) -> Conn | None:
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None


_POOL = Pool()
_TARGETS: dict[str, tuple[tuple[str, int], str, bytes]] = {}


def _target(url: str) -> tuple[tuple[str, int], str, bytes]:
    cached = _TARGETS.get(url)
    if cached is None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise httpx.UnsupportedProtocol("the prototype speaks plain http only")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        cached = ((parts.hostname, parts.port or 80), path, f"host: {parts.netloc}\r\n".encode())
        if len(_TARGETS) < 1024:
            _TARGETS[url] = cached
    return cached


async def _exchange(client: httpx.AsyncClient, method: str, url: str,
                    headers: Mapping[str, str], content: bytes | AsyncIterator[bytes] | None,
                    ) -> Response:
    key, path, host = _target(url)
    timeout = client.timeout
    connect_timeout = timeout.connect or 10.0
    read_timeout = timeout.read or 600.0
    lines = [f"{method} {path} HTTP/1.1\r\n".encode(), host]
    lines += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()]
    streamed = content is not None and not isinstance(content, bytes)
    body = content if isinstance(content, bytes) else b""
    lines.append(b"transfer-encoding: chunked\r\n\r\n" if streamed
                 else b"content-length: %d\r\n\r\n" % len(body))
    head = b"".join(lines)
    for attempt in (1, 2):
        conn = _POOL.reuse(key) if attempt == 1 else None
        reused = conn is not None
        if conn is None:
            conn = await _POOL.connect(key, connect_timeout)
        conn.begin()
        assert conn.transport is not None
        conn.transport.write(head + body)
        if streamed:
            assert not isinstance(content, bytes) and content is not None
            async for piece in content:
                if piece:
                    conn.transport.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            conn.transport.write(b"0\r\n\r\n")
        try:
            await _wait(conn, conn.head, read_timeout)
        except httpx.RemoteProtocolError:
            conn.close()
            if reused and not conn.got_bytes and not streamed:
                continue  # a keep-alive connection the upstream had closed: once more, fresh
            raise
        except BaseException:
            conn.close()
            raise
        return Response(conn, _POOL, key, read_timeout)
    raise httpx.RemoteProtocolError("unreachable")


_original_open_stream: Any = None


async def open_stream(client: httpx.AsyncClient, method: str, url: str,
                      headers: Mapping[str, str],
                      content: bytes | AsyncIterator[bytes] | None, **extra: Any) -> Any:
    """`proxy.upstream.open_stream`'s contract; `extra` (state, name) goes to its `observed`."""
    from proxy import upstream
    from proxy.errors import UpstreamError, UpstreamTimeout

    started = time.perf_counter()
    try:
        response = await _exchange(client, method, url, headers, content)
    except httpx.TimeoutException as exc:
        if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
            raise UpstreamError("The upstream could not be reached") from None
        raise UpstreamTimeout("The upstream did not answer in time") from None
    except httpx.HTTPError:
        raise UpstreamError("The upstream could not be reached") from None
    observed = getattr(upstream, "observed", None)
    if observed is not None:
        observed(extra.get("state"), extra.get("name", "default"), response.status_code,
                 time.perf_counter() - started)
    if response.is_redirect:
        await response.aclose()
        raise UpstreamError("The upstream answered with a redirect, which is not followed")
    return response


def apply() -> None:
    from proxy import upstream

    upstream.open_stream = open_stream


if __name__ == "__main__":
    apply()
    _base.serve()
