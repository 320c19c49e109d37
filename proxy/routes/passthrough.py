"""Every `/v1/*` route the proxy does not own goes upstream unchanged but for the key.

Bodies stream both ways; nothing is stored. Also the relay for chat requests without a session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
from litestar import Request, Response, route
from litestar.enums import HttpMethod
from litestar.response import Stream
from litestar.response.streaming import ASGIStreamingResponse

from proxy import upstream as up
from proxy.app import Runtime, runtime
from proxy.config import Upstream
from proxy.routes.parsing import authenticate


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


async def _body_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.HTTPError:
        return  # the upstream broke off: end the client's body where it stopped
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
) -> Response[Any]:
    """Send one request upstream and stream its answer back as it arrives."""
    response = await up.open_stream(
        rt.http, method, up.url_for(target, path, query), up.request_headers(target, headers),
        content,
    )
    return ClosingStream(
        _body_chunks(response),
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
    content = request.stream() if request.method in ("POST", "PUT", "PATCH") else None
    return await relay(
        rt,
        rt.settings.default_upstream,
        request.method,
        path if path.startswith("/") else "/" + path,
        request.url.query,
        request.headers.items(),
        content,
    )


handlers = [passthrough]
