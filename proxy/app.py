"""create_app(): the lifespan (pool, HTTP client, tokenizer), the routes and the error handlers.

Nothing happens at import. The lifespan owns every collaborator a request uses and puts them on
`app.state.rt` as one `Runtime`; handlers reach it through `runtime(request)`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from proxy import db
from proxy.config import Settings, load_settings
from proxy.errors import (
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    error_bytes,
)
from proxy.migrate import migrate
from proxy.tokens import ModelTable, TokenCounter
from proxy.upstream import make_client

log = logging.getLogger("chatproxy")


@dataclass
class Runtime:
    """Everything a request needs, owned by the lifespan."""

    settings: Settings
    pool: asyncpg.Pool
    http: httpx.AsyncClient
    tokens: TokenCounter
    # Write-backs detached from their request (a client that went away); shutdown awaits them.
    writes: set[asyncio.Task[Any]] = field(default_factory=set)

    def track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)
        return task


def runtime(request: Request[Any, Any, Any]) -> Runtime:
    rt: Runtime = request.app.state.rt
    return rt


def _lifespan(settings: Settings, http_client: httpx.AsyncClient | None) -> Any:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        table = ModelTable.load(settings.models_file)
        tokens = TokenCounter(table)
        encodings = {table.defaults.encoding} | {m.encoding for _, m in table._models}
        await asyncio.to_thread(lambda: [tokens.encoding(name) for name in encodings])
        url = await asyncio.to_thread(db.database_url, settings)
        pool = await db.create_pool(url, settings)
        async with pool.acquire() as conn:
            applied = await migrate(conn)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        log.info("database: %s", db.describe(settings))
        for upstream in settings.all_upstreams():
            log.info("upstream %s: %s", upstream.name, upstream.base_url)
        http = http_client or make_client(settings)
        app.state.rt = rt = Runtime(settings, pool, http, tokens)
        try:
            yield
        finally:
            if rt.writes:
                await asyncio.wait(set(rt.writes), timeout=settings.shutdown_grace + 5)
            if http_client is None:
                await http.aclose()
            await pool.close()

    return lifespan


# --- errors -----------------------------------------------------------------------------------


def _render(error: ProxyError) -> Response[bytes]:
    return Response(error_bytes(error), status_code=error.status, media_type="application/json")


def _request_id(request: Request[Any, Any, Any]) -> str | None:
    value: str | None = request.scope.get("state", {}).get("request_id")
    return value


def handle_proxy_error(request: Request[Any, Any, Any], exc: ProxyError) -> Response[bytes]:
    return _render(exc)


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Litestar's own errors (routing, body size) in the OpenAI envelope."""
    error: ProxyError
    if exc.status_code == 404:
        error = NotFound(f"Unknown route: {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} not allowed on {request.url.path}")
    elif exc.status_code == 413:
        error = PayloadTooLarge("Request body too large")
    elif exc.status_code == 400:
        error = BadRequest("Malformed request")
    elif exc.status_code < 500:
        error = BadRequest("Malformed request")
        error.status = exc.status_code
    else:
        return handle_internal_error(request, exc)
    return _render(error)


def handle_internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.error(
        "unhandled error on %s %s (request id %s)",
        request.method,
        request.scope.get("path"),
        _request_id(request),
        exc_info=exc,
    )
    return _render(InternalError())


# --- request ids ------------------------------------------------------------------------------


def _valid_request_id(value: bytes) -> bool:
    return 0 < len(value) <= 128 and all(0x21 <= b <= 0x7E for b in value)


def request_id_middleware(app: ASGIApp) -> ASGIApp:
    """Takes X-Request-Id from the client (or makes one) and echoes it on the response."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        rid = incoming if _valid_request_id(incoming) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                headers.append((b"x-request-id", rid))
                message["headers"] = headers
            await send(message)

        await app(scope, receive, send_with_id)

    return middleware


# --- the app ----------------------------------------------------------------------------------


def create_app(settings: Settings, *, http_client: httpx.AsyncClient | None = None) -> Litestar:
    from proxy.routes import admin, chat, health, passthrough, sessions

    return Litestar(
        route_handlers=[
            *health.handlers,
            *admin.handlers,
            *sessions.handlers,
            *chat.handlers,
            *passthrough.handlers,
        ],
        lifespan=[_lifespan(settings, http_client)],
        exception_handlers={
            ProxyError: handle_proxy_error,
            HTTPException: handle_http_exception,
            Exception: handle_internal_error,
        },
        middleware=[request_id_middleware],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="chatproxy",
            version="0.1.0",
            path="/schema",
            render_plugins=[SwaggerRenderPlugin(path="/")],
        ),
        logging_config=None,
        debug=False,
    )


def app_from_env() -> Litestar:
    """The uvicorn factory used by `chatproxy serve` (each worker builds its own app)."""
    return create_app(load_settings(os.environ))
