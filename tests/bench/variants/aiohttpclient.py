"""Variant: aiohttp's client underneath the upstream client, in place of proxy/transport.py.

For measurement only (issue 15: keep the hand-written transport only if it beats a library).
`make_client` is unchanged and builds the same `UpstreamClient`; the name `FastTransport` it
calls is swapped for `AiohttpTransport`, an `httpx.AsyncBaseTransport` over one
`aiohttp.ClientSession` with the same limits (connections per origin capped at
`upstream_max_connections`, idle ones kept 60 s, no cookies, no decompression). The routes and
`upstream._send` run as shipped; only the HTTP/1.1 client differs. Proxy routes are ignored (the
benchmark has none).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import _base
import aiohttp
import httpx
import yarl


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise httpx.ReadTimeout("The upstream did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from None

    async def aclose(self) -> None:
        if self.response.content.at_eof():
            self.response.release()  # read to its end: the connection goes back to the pool
        else:
            self.response.close()


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    async for piece in stream:
        yield piece


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, routes: Any = None, max_connections: int = 0,
                 max_keepalive: int = 256, keepalive_expiry: float = 60.0) -> None:
        self._limit = max_connections
        self._expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None  # made in the server's loop

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=self._limit,
                                             keepalive_timeout=self._expiry)
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.get("pool"),
                                        sock_connect=timeouts.get("connect"),
                                        sock_read=timeouts.get("read"))
        try:
            data: Any = request.content
        except httpx.RequestNotRead:
            data = _chunks(request.stream)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        try:
            response = await self._open().request(
                request.method, yarl.URL(str(request.url), encoded=True), headers=headers,
                data=data, timeout=timeout, allow_redirects=False)
        except aiohttp.ConnectionTimeoutError:
            raise httpx.ConnectTimeout("Timed out connecting to the upstream") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise httpx.ReadTimeout("The upstream did not answer in time") from None
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc)) from None
        except aiohttp.ClientError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from None
        return httpx.Response(response.status, headers=list(response.raw_headers),
                              stream=_Body(response), extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def apply() -> None:
    from proxy import upstream

    upstream.FastTransport = AiohttpTransport  # type: ignore[misc,assignment]


if __name__ == "__main__":
    apply()
    _base.serve()
