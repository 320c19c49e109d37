"""The upstreams: one pooled httpx client per process, requests built with the upstream's key.

`relay` sends a request the proxy does not look into and answers with the upstream's answer as
it arrives (the passthrough routes, a chat request without a session).

Transport failures become the proxy's own errors: an unreachable upstream or a connect timeout is
502, no next byte within the read timeout is 504, no free place under the per-origin connection
cap within the connect timeout is 503 `upstream_busy`, a redirect is 502 and is never followed.
The client's key and the proxy's own headers never go upstream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from http.cookiejar import CookieJar
from typing import Any
from urllib.parse import urlsplit

import httpx
from litestar import Response

from proxy import codec, metrics, sse
from proxy.config import Settings, Upstream
from proxy.errors import ProxyError, UpstreamBusy, UpstreamError, UpstreamTimeout
from proxy.streamresponse import ClosingStream
from proxy.transport import FastTransport, Route

log = logging.getLogger("chatproxy.upstream")

MAX_UPSTREAM_BODY = 64 * 1024 * 1024  # a non-streamed answer larger than this is a 502

# Never forwarded upstream: hop-by-hop headers, the client's credentials, and the proxy's own.
_DROP_REQUEST = frozenset(
    {
        "host", "authorization", "content-length", "connection", "keep-alive",
        "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
        "proxy-connection", "cookie", "accept-encoding", "expect",
        "x-session-id", "idempotency-key", "x-request-id", "x-forwarded-for",
        "x-forwarded-host", "x-forwarded-proto", "forwarded", "x-real-ip",
    }
)
# Never copied back to the client: hop-by-hop headers and the ones the proxy sets itself.
# Bodies are relayed decoded (the proxy asks for identity anyway), so content-encoding goes too.
_DROP_RESPONSE = frozenset(
    {
        "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "content-length", "content-encoding", "proxy-authenticate", "set-cookie", "server",
        "date",
    }
)


class _EmptyJar(CookieJar):
    def set_cookie(self, cookie: Any) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


class _NoCookies(httpx.Cookies):
    """A jar that keeps nothing: one user's upstream cookies must never ride another's request."""

    def __init__(self) -> None:
        super().__init__(_EmptyJar())

    def extract_cookies(self, response: httpx.Response) -> None:
        return None  # also skips building a urllib request per response to look for Set-Cookie

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None


class UpstreamClient(httpx.AsyncClient):
    """`httpx.AsyncClient` without a cookie jar (`cookies` is always empty, and stays so).

    `open_stream` sends through its `transport` directly: the proxy uses none of the client's
    layers (auth, redirects, cookies, event hooks, default headers), only its timeouts.
    """

    _no_cookies = _NoCookies()

    def __init__(self, *, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout) -> None:
        super().__init__(timeout=timeout, follow_redirects=False, trust_env=False,
                         transport=transport)
        self.transport = transport
        self.timeouts = timeout.as_dict()  # read (never changed) by the transport

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, value: Any) -> None:
        return None


def make_client(
    settings: Settings, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The process's one upstream client; `transport` lets tests put a mock underneath.

    Without one, the client sends through `FastTransport` (proxy/transport.py), each upstream's
    origin routed as its settings say (proxy, CA bundle: resolved once, in `load_settings`).
    A request waits for a place under `upstream_max_connections` at most the connect timeout.
    """
    timeout = httpx.Timeout(
        connect=settings.upstream_connect_timeout,
        read=settings.upstream_timeout,
        write=settings.upstream_timeout,
        pool=settings.upstream_connect_timeout,
    )
    if transport is None:
        routes = {}
        for upstream in settings.all_upstreams():
            routes[upstream.base_url] = Route(upstream.proxy, upstream.ca_bundle)
            if upstream.proxy is not None:
                log.info("upstream %s: through the proxy at %s", upstream.name,
                         _without_credentials(upstream.proxy))
        transport = FastTransport(routes=routes,
                                  max_connections=settings.upstream_max_connections,
                                  max_keepalive=256, keepalive_expiry=60.0)
    return UpstreamClient(timeout=timeout, transport=transport)


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def request_headers(upstream: Upstream, incoming: Iterable[tuple[str, str]]) -> dict[bytes, bytes]:
    """The client's headers minus credentials and hop-by-hop ones, plus the upstream's key.

    `incoming` is latin-1 text (as ASGI servers and Litestar decode it), so encoding it back
    gives the client's bytes exactly: a header such as `X-Title: Café` travels as it came.
    Headers the client's `Connection` header names are hop-by-hop too (RFC 9110 §7.6.1).
    """
    headers: dict[bytes, bytes] = {}
    named: list[str] = []
    for key, value in incoming:
        name = key.lower()
        if name in _DROP_REQUEST:
            if name == "connection":
                named.append(value)
            continue
        headers[name.encode("latin-1")] = value.encode("latin-1")
    for token in _tokens(named):
        headers.pop(token.encode("latin-1"), None)
    headers[b"accept-encoding"] = b"identity"
    if upstream.api_key:
        headers[b"authorization"] = f"Bearer {upstream.api_key}".encode()
    return headers


def response_headers(headers: httpx.Headers) -> dict[str, str]:
    """The upstream's headers for the client, minus hop-by-hop ones (and those its `Connection`
    header names), as latin-1 text: the client gets the upstream's bytes exactly. A repeated
    header is joined with commas, as `httpx.Headers.items()` does."""
    result: dict[str, str] = {}
    named: list[str] = []
    for raw_key, raw_value in headers.raw:
        name = raw_key.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name in _DROP_RESPONSE:
            if name == "connection":
                named.append(value)
        elif name in result:
            result[name] += ", " + value
        else:
            result[name] = value
    for token in _tokens(named):
        result.pop(token, None)
    return result


def _tokens(values: list[str]) -> list[str]:
    """The header names listed in `Connection` header values, lowercased."""
    return [token.strip().lower() for value in values for token in value.split(",")]


_URLS: dict[str, httpx.URL] = {}  # parsed once: httpx parses a str URL on every request
_URL_CACHE = 1024


def _parsed(url: str) -> httpx.URL:
    parsed = _URLS.get(url)
    if parsed is None:
        parsed = httpx.URL(url)
        if len(_URLS) < _URL_CACHE:
            _URLS[url] = parsed
    return parsed


def url_for(upstream: Upstream, path: str, query: str = "") -> str:
    """`path` is relative to the upstream's base URL (`/chat/completions`, `/models`)."""
    url = upstream.base_url + path
    return f"{url}?{query}" if query else url


async def open_stream(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    headers: Mapping[bytes, bytes],
    content: bytes | AsyncIterator[bytes] | None,
    *,
    state: dict[str, Any] | None = None,
    name: str = "default",
) -> httpx.Response:
    """Send a request and return the response with its body still unread (caller closes it).

    When the response headers arrive, the latency goes to the upstream metric (labelled with
    the upstream's configured `name`) and, with `state` (the request's `scope["state"]`), to
    the access log line. A transport failure records nothing: it has no upstream status.
    """
    started = time.perf_counter()
    try:
        response = await _send(client, method, _parsed(url), headers, content)
    except httpx.TimeoutException as exc:
        if isinstance(exc, httpx.PoolTimeout):
            raise UpstreamBusy() from None
        if isinstance(exc, httpx.ConnectTimeout):
            raise UpstreamError("The upstream could not be reached") from None
        raise UpstreamTimeout("The upstream did not answer in time") from None
    except httpx.HTTPError:
        raise UpstreamError("The upstream could not be reached") from None
    observed(state, name, response.status_code, time.perf_counter() - started)
    if response.is_redirect:
        await response.aclose()
        raise UpstreamError("The upstream answered with a redirect, which is not followed")
    return response


async def _send(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL,
    headers: Mapping[bytes, bytes],
    content: bytes | AsyncIterator[bytes] | None,
) -> httpx.Response:
    if not isinstance(client, UpstreamClient):
        request = client.build_request(method, url, headers=headers, content=content)
        return await client.send(request, stream=True)
    request = httpx.Request(method, url, headers=headers, content=content,
                            extensions={"timeout": client.timeouts})
    response = await client.transport.handle_async_request(request)
    response.request = request
    return response


def observed(state: dict[str, Any] | None, name: str, status: int, seconds: float) -> None:
    """An upstream answered: its metric, and the access log's fields (proxy/logs.py)."""
    metrics.upstream_latency(seconds, status, upstream=name)
    if state is not None:
        state["upstream"] = name
        state["upstream_status"] = status
        state["upstream_latency"] = seconds


async def read_body(response: httpx.Response, limit: int = MAX_UPSTREAM_BODY) -> bytes:
    """The whole (decoded) body, or 502/504 when it is too large or breaks off."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                raise UpstreamError("The upstream's answer is too large")
            chunks.append(chunk)
    except httpx.TimeoutException:
        raise UpstreamTimeout("The upstream did not answer in time") from None
    except httpx.HTTPError:
        raise UpstreamError("The upstream's answer broke off") from None
    finally:
        await response.aclose()
    return b"".join(chunks)


# --- relaying an answer as it came -------------------------------------------------------


async def _body_chunks(
    response: httpx.Response, ttfb: tuple[float, str] | None = None
) -> AsyncIterator[bytes]:
    tail = b""  # the last bytes relayed: where the stream stopped, if it breaks off
    try:
        async for chunk in response.aiter_bytes():
            if ttfb is not None:
                metrics.stream_ttfb(time.perf_counter() - ttfb[0], upstream=ttfb[1])
                ttfb = None
            tail = chunk[-4:] if len(chunk) >= 4 else (tail + chunk)[-4:]
            yield chunk
    except httpx.HTTPError as exc:
        # The upstream broke off. An event stream ends with an error event (as a session
        # turn's does), so an SDK sees the failure; any other body ends where it stopped.
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            failure: ProxyError = (
                UpstreamTimeout("The upstream stopped sending before the reply was complete")
                if isinstance(exc, httpx.TimeoutException)
                else UpstreamError("The upstream broke off the stream")
            )
            yield sse.closing(tail) + b"data: " + codec.dumps(failure.body()) + b"\n\n"
    finally:
        await response.aclose()


async def relay(
    client: httpx.AsyncClient,
    target: Upstream,
    method: str,
    path: str,
    query: str,
    headers: Iterable[tuple[str, str]],
    content: bytes | AsyncIterator[bytes] | None,
    *,
    state: dict[str, Any] | None = None,
    stream: bool = False,
    whole: bool = False,
) -> Response[Any]:
    """Send one request upstream and stream its answer back as it arrives.

    `state` is the request's `scope["state"]` (the access log's upstream fields); `stream`
    says the answer is a streamed chat completion, whose time to first byte is measured.
    `whole` says the answer is one JSON document (a chat completion without `stream`): it is
    read whole and sent as a plain response, cheaper than a streamed one; an answer that
    breaks off is then a 502 instead of a body cut short.
    """
    response = await open_stream(
        client, method, url_for(target, path, query), request_headers(target, headers),
        content, state=state, name=target.name,
    )
    if whole:
        raw = await read_body(response)
        return Response(
            raw, status_code=response.status_code, headers=response_headers(response.headers)
        )
    started = state.get("request_started") if state is not None else None
    ttfb = None
    if stream and response.status_code == 200 and isinstance(started, float):
        ttfb = (started, target.name)
    return ClosingStream(
        _body_chunks(response, ttfb),
        status_code=response.status_code,
        headers=response_headers(response.headers),
    )
