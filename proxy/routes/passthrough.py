"""Every `/v1/*` route the proxy does not own goes upstream unchanged but for the key.

Bodies stream both ways (`upstream.relay`); nothing is stored.

With `[[upstreams]]` configured, a request goes where its model is served (contract §2): the
`model` of a JSON body (`/v1/embeddings`, `/v1/completions`, ...; the body is then read whole
instead of streamed, and forwarded as it came) or the id in `/v1/models/{model}`; anything
else (multipart uploads, routes without a model) goes to the default upstream.

`GET /v1/models` with several upstreams is every upstream's list, merged into one (with the
default upstream alone it is a plain relay). Every upstream is asked at once, with its own key
(none for one whose `api_key_env` is empty). One that fails — unreachable, too slow, an HTTP
error, a 200 that is not a model list — is skipped and logged by name and status, never with its
key. When all of them fail, the default upstream's HTTP error is passed through as it came
(status, body, `Retry-After`), or, when the default did not answer with one, its own 502/504. A
model id listed by several upstreams appears once, from the first in configuration order (the
default upstream last).

The path goes upstream as the client sent it, checked first so that it can never leave the
upstream's base URL (`upstream_path`). A body goes byte for byte, unparsed (unless its `model`
is read for routing), so the upstream alone judges it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import msgspec
from litestar import Request, Response, route
from litestar.enums import HttpMethod

from proxy import codec
from proxy import upstream as up
from proxy.access import authenticate
from proxy.config import Upstream
from proxy.errors import BadRequest, ProxyError, UpstreamError
from proxy.reading import json_content_type
from proxy.runtime import Runtime, runtime

log = logging.getLogger("chatproxy.models")


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
    return await up.relay(
        rt.http, target, request.method, forwarded, request.url.query, request.headers.items(),
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


# --- GET /v1/models with several upstreams -------------------------------------------------


@dataclass(frozen=True)
class _Listing:
    """One upstream's answer: its models, or why it has none."""

    upstream: Upstream
    models: list[Any] | None = None
    status: int | None = None  # the upstream's HTTP status, when it answered
    answer: Response[Any] | None = None  # an HTTP error, kept to pass through
    error: ProxyError | None = None


async def merged_models(rt: Runtime, request: Request[Any, Any, Any]) -> Response[Any]:
    upstreams = rt.settings.all_upstreams()
    started = time.perf_counter()
    listings = await asyncio.gather(*(_list(rt, request, u) for u in upstreams))
    state = request.scope["state"]
    state["upstream"] = ",".join(u.name for u in upstreams)
    state["upstream_latency"] = time.perf_counter() - started
    answered = [listing for listing in listings if listing.models is not None]
    if not answered:
        default = listings[-1]
        state["upstream_status"] = default.status
        if default.answer is not None:
            return default.answer
        raise default.error or UpstreamError("No upstream answered with a list of models")
    state["upstream_status"] = 200
    seen: set[Any] = set()
    data: list[Any] = []
    for listing in answered:
        for item in listing.models or ():
            model_id = item.get("id") if isinstance(item, dict) else None
            if isinstance(model_id, str):
                if model_id in seen:
                    continue
                seen.add(model_id)
            data.append(item)
    body = codec.dumps({"object": "list", "data": data})
    return Response(body, status_code=200, media_type="application/json")


async def _list(
    rt: Runtime, request: Request[Any, Any, Any], upstream: Upstream
) -> _Listing:
    try:
        response = await up.open_stream(
            rt.http, "GET", up.url_for(upstream, "/models", request.url.query),
            up.request_headers(upstream, request.headers.items()), None, name=upstream.name,
        )
        raw = await up.read_body(response)
    except ProxyError as exc:
        _skipped(upstream, exc.code)
        return _Listing(upstream, error=exc)
    status = response.status_code
    if status != 200:
        _skipped(upstream, f"HTTP {status}")
        passed = Response(raw, status_code=status, headers=up.response_headers(response.headers))
        return _Listing(upstream, status=status, answer=passed)
    try:
        answer = codec.loads(raw)
    except codec.InvalidJSON:
        answer = None
    models = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(models, list):
        _skipped(upstream, "an answer that is not a list of models")
        error = UpstreamError("The upstream answered with a body that is not a list of models")
        return _Listing(upstream, status=status, error=error)
    return _Listing(upstream, models=models, status=status)


def _skipped(upstream: Upstream, reason: str) -> None:
    # By its configured name only: never its key (nor the request's headers).
    log.warning(
        "model list from upstream %s skipped: %s", upstream.name, reason,
        extra={"upstream": upstream.name},
    )


handlers = [passthrough]
