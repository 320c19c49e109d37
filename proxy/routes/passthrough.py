"""Every `/v1/*` route the proxy does not own goes upstream unchanged but for the key.

Bodies stream both ways; nothing is stored. Also the relay for chat requests without a session.

With `[[upstreams]]` configured, a request goes where its model is served (contract §2): the
`model` of a JSON body (`/v1/embeddings`, `/v1/completions`, ...; the body is then read whole
instead of streamed, and forwarded as it came) or the id in `/v1/models/{model}`; anything
else (multipart uploads, routes without a model) goes to the default upstream.
`GET /v1/models` merges every upstream's list (proxy/routes/models.py).

The path goes upstream as the client sent it, checked first so that it can never leave the
upstream's base URL (`upstream_path`). A body goes byte for byte, unparsed (unless its `model`
is read for routing), so the upstream alone judges it.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx
import msgspec
from litestar import Request, Response, route
from litestar.enums import HttpMethod
from litestar.response import Stream
from litestar.response.streaming import ASGIStreamingResponse

from proxy import codec, metrics
from proxy import upstream as up
from proxy.app import Runtime, runtime
from proxy.config import Upstream
from proxy.errors import BadRequest, ProxyError, UpstreamError, UpstreamTimeout
from proxy.routes.models import merged_models
from proxy.routes.parsing import authenticate, json_content_type


class _ClosingStreamingResponse(ASGIStreamingResponse):
    """Closes the body iterator however the response ends, so its `finally` runs at once."""

    __slots__ = ()

    async def send_body(self, send: Any, receive: Any) -> None:
        try:
            await super().send_body(send, receive)
        finally:
            aclose = getattr(self.iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class ClosingStream(Stream):
    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:
        response = super().to_asgi_response(*args, **kwargs)
        response.__class__ = _ClosingStreamingResponse
        return response


async def _body_chunks(
    response: httpx.Response, ttfb: tuple[float, str] | None = None
) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_bytes():
            if ttfb is not None:
                metrics.stream_ttfb(time.perf_counter() - ttfb[0], upstream=ttfb[1])
                ttfb = None
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
            yield b"\n\ndata: " + codec.dumps(failure.body()) + b"\n\n"
    finally:
        await response.aclose()


async def relay(
    rt: Runtime,
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
    response = await up.open_stream(
        rt.http, method, up.url_for(target, path, query), up.request_headers(target, headers),
        content, state=state, name=target.name,
    )
    if whole:
        raw = await up.read_body(response)
        return Response(
            raw, status_code=response.status_code, headers=up.response_headers(response.headers)
        )
    started = state.get("request_started") if state is not None else None
    ttfb = None
    if stream and response.status_code == 200 and isinstance(started, float):
        ttfb = (started, target.name)
    return ClosingStream(
        _body_chunks(response, ttfb),
        status_code=response.status_code,
        headers=up.response_headers(response.headers),
    )


@route(
    "/v1/{path:path}",
    http_method=[
        HttpMethod.GET, HttpMethod.POST, HttpMethod.PUT, HttpMethod.PATCH, HttpMethod.DELETE,
    ],
    include_in_schema=False,
)
async def passthrough(request: Request[Any, Any, Any], path: str) -> Response[Any]:
    await authenticate(request, stores_nothing=True)
    rt = runtime(request)
    forwarded = upstream_path(request.scope.get("raw_path") or request.url.path.encode())
    path = path if path.startswith("/") else "/" + path
    has_body = request.method in ("POST", "PUT", "PATCH")
    content: bytes | AsyncIterator[bytes] | None = None
    target = rt.settings.default_upstream
    if rt.settings.upstreams:  # several upstreams: route by model
        if request.method == "GET" and path == "/models":
            return await merged_models(rt, request)
        if path.startswith(_MODEL_PATH):
            target = rt.settings.upstream_for(path[len(_MODEL_PATH):])
        elif has_body and json_content_type(request, missing=False):
            content = await request.body()
            target = rt.settings.upstream_for(_model_of(content))
    if has_body and content is None:
        content = request.stream()
    return await relay(
        rt, target, request.method, forwarded, request.url.query, request.headers.items(),
        content, state=request.scope["state"],
    )


_PREFIX = b"/v1"
_PRINTABLE = re.compile(rb"[\x21-\x7e]*")
_ENCODED_SLASH = re.compile(rb"%2f", re.IGNORECASE)
_NEVER = re.compile(rb"[\x00-\x1f\x7f\\?#]")  # control characters, backslash, ? and #


def upstream_path(raw_path: bytes) -> str:
    """The path relative to the upstream's base URL for a `/v1/...` request path as it was sent.

    Every path stays under the upstream's base however the upstream reads it, or is a 400
    naming `path`: no dot segment (`.` or `..`, plain or percent-encoded in any case), no
    backslash, `?`, `#` or control character (CR, LF, NUL, ...), raw or percent-encoded, and
    nothing but printable ASCII as sent. An encoded slash goes as the plain `/` it stands for
    (the OpenAI SDK writes a model id `org/model` in a path as `org%2Fmodel`), so the upstream
    sees the very segments checked here; every other byte goes as the client sent it.
    """
    raw = raw_path.split(b"?", 1)[0]  # a test transport may leave the query on
    rest = raw[len(_PREFIX):] or b"/"
    if not raw.startswith(_PREFIX) or rest[:1] != b"/" or not _PRINTABLE.fullmatch(rest):
        raise _bad_path()
    rest = _ENCODED_SLASH.sub(b"/", rest)
    decoded = unquote_to_bytes(rest)
    if _NEVER.search(decoded) or any(s in (b".", b"..") for s in decoded.split(b"/")):
        raise _bad_path()
    return rest.decode("ascii")


def _bad_path() -> BadRequest:
    return BadRequest(
        "Invalid path: dot segments, backslashes, encoded ? or #, and characters other than "
        "printable ASCII are not allowed", param="path",
    )


_MODEL_PATH = "/models/"


class _Model(msgspec.Struct):
    """The one field routing reads; msgspec skips the rest of the body without building it."""

    model: Any = None


def _model_of(raw: bytes) -> Any:
    """The body's `model`, or None when it has none (the body still goes upstream as it is)."""
    try:
        return msgspec.json.decode(raw, type=_Model).model
    except (msgspec.DecodeError, RecursionError):
        pass
    try:  # the stdlib path: a lone surrogate somewhere in the body
        value = codec.loads(raw)
    except codec.InvalidJSON:
        return None
    return value.get("model") if isinstance(value, dict) else None


handlers = [passthrough]
