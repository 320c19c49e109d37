"""`/mcp`: the MCP server (`proxy.mcp.server`) over Streamable HTTP, in the app (contract §9).

Every request is authenticated here, before the MCP layer sees it, with the key check of the
REST routes (`verify_key`, its lease included): no valid `sk-cp-` key is a 401 in the OpenAI
envelope, the database down a 503. The user id goes on the request's scope (`state.user_id`,
which the access log reports too); the tools read it there through the SDK's request context.

The SDK's session manager runs stateless, answering JSON: a request carries everything it
needs, so any worker of `chatproxy serve --workers N`, or any process behind a load balancer,
can answer any request. The manager lives as long as the app (`lifespan`), after the runtime
the tools use and before it closes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.handlers import asgi
from litestar.types import (
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Receive,
    Scope,
    Send,
)
from mcp.server.mcpserver import Context
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings

from proxy import auth
from proxy.access import verify_key
from proxy.errors import ProxyError, error_bytes, unknown_route
from proxy.mcp import server as mcpserver

PATH = "/mcp"


def caller(ctx: Context) -> str:
    """The user the request's key belongs to, put on its scope by `mount`."""
    request = ctx.request_context.request
    assert request is not None, "an HTTP request always has one"
    user_id: str = request.scope["state"]["user_id"]
    return user_id


@asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    server = mcpserver.build(lambda: app.state.rt, caller)
    server.streamable_http_app(
        stateless_http=True,
        json_response=True,
        max_request_body_size=app.state.rt.settings.max_body_bytes,
        # The SDK's DNS rebinding guard (a Host/Origin allow-list) is for servers a browser
        # page could reach with ambient credentials; every request here needs a bearer key,
        # which such a page does not have, and the rest of the API has no such list either.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    manager: StreamableHTTPSessionManager = server.session_manager
    app.state.mcp = manager
    async with manager.run():
        yield


async def _refuse(send: Send, error: ProxyError) -> None:
    start: HTTPResponseStartEvent = {"type": "http.response.start", "status": error.status,
                                     "headers": [(b"content-type", b"application/json")]}
    body: HTTPResponseBodyEvent = {"type": "http.response.body", "body": error_bytes(error),
                                   "more_body": False}
    await send(start)
    await send(body)


@asgi(PATH, is_mount=True, copy_scope=False, include_in_schema=False)
async def mount(scope: Scope, receive: Receive, send: Send) -> None:
    app: Litestar = scope["litestar_app"]
    if scope["path"] != "/":
        # Litestar matches a mount by prefix and leaves what follows it in `path`: `/mcpx` and
        # `/mcp/x` land here too, and are unknown routes (contract §4), key or no key.
        shown = _text(scope.get("raw_path")) or PATH + scope["path"]
        await _refuse(send, unknown_route(str(scope.get("method", "GET")), shown))
        return
    scope["path_template"] = PATH  # the route's label in the access log and the metrics
    headers: dict[bytes, bytes] = dict(scope["headers"])
    try:
        key_hash = auth.client_key_hash(_text(headers.get(b"authorization")))
        user_id = await verify_key(app.state.rt, key_hash)
    except ProxyError as exc:
        await _refuse(send, exc)
        return
    scope["state"]["user_id"] = user_id
    manager: StreamableHTTPSessionManager = app.state.mcp
    handle: Any = manager.handle_request  # an ASGI app, typed with Starlette's names for it
    await handle(scope, receive, send)


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


handlers: list[Any] = [mount]
