"""create_app(): the lifespan (pool, HTTP client, tokenizer), the routes and the error handlers.

Nothing happens at import. The lifespan owns every collaborator a request uses and puts them on
`app.state.rt` as one `Runtime`; handlers reach it through `runtime(request)`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from proxy import db, keylease, logs, metrics, openapi, retention
from proxy.config import Settings, load_settings
from proxy.errors import (
    BadRequest,
    InternalError,
    MethodNotAllowed,
    PayloadTooLarge,
    ProxyError,
    error_bytes,
    unknown_route,
)
from proxy.migrate import migrate
from proxy.tokens import ModelTable, TokenCounter
from proxy.upstream import make_client

log = logging.getLogger("chatproxy")


@dataclass
class Runtime:
    """Everything a request needs, owned by the lifespan."""

    settings: Settings
    pool: db.Pool
    http: httpx.AsyncClient
    tokens: TokenCounter
    # Write-backs detached from their request (a client that went away); shutdown awaits them.
    writes: set[asyncio.Task[Any]] = field(default_factory=set)
    # Keys this process verified: trusted under a lease, and while the database is down
    # (proxy/keylease.py).
    keys: keylease.KeyLease = field(default_factory=keylease.KeyLease)

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
        conn = await pool.acquire(db.CONNECT_TIMEOUT)
        try:
            applied = await migrate(conn)
        finally:
            pool.release(conn)
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        log.info("database: %s", db.describe(settings))
        for upstream in settings.all_upstreams():
            log.info("upstream %s: %s", upstream.name, upstream.base_url)
        http = http_client or make_client(settings)
        app.state.rt = rt = Runtime(settings, pool, http, tokens)
        job = asyncio.create_task(retention.run_hourly(pool, settings))  # retention, pruning
        feed = asyncio.create_task(keylease.follow(rt.keys, url))
        try:
            yield
        finally:
            job.cancel()
            feed.cancel()
            await asyncio.gather(job, feed, return_exceptions=True)
            # Requests cancelled at the grace deadline hand their write-backs over as they
            # unwind, possibly while this waits: wait until none is left (or the deadline).
            loop = asyncio.get_running_loop()
            deadline = loop.time() + settings.shutdown_grace + 5
            while rt.writes and (left := deadline - loop.time()) > 0:
                await asyncio.wait(set(rt.writes), timeout=left)
            if http_client is None:
                await http.aclose()
            await pool.close()

    return lifespan


# --- errors -----------------------------------------------------------------------------------


def render_error(error: ProxyError, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(
        error_bytes(error),
        status_code=error.status,
        media_type="application/json",
        headers=headers,
    )


def handle_proxy_error(request: Request[Any, Any, Any], exc: ProxyError) -> Response[bytes]:
    return render_error(exc)


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Litestar's own errors (routing, body size, parameter validation) in the OpenAI envelope."""
    error: ProxyError
    headers = None
    if exc.status_code == 404:
        error = unknown_route(request.method, request.url.path)
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"Method {request.method} not allowed on {request.url.path}")
        allow = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow")
        headers = {"Allow": allow} if allow else None
    elif exc.status_code == 413:
        error = PayloadTooLarge("Request body too large")
    elif exc.status_code < 500:
        error = _bad_request(exc)
        error.status = exc.status_code
    else:
        return handle_internal_error(request, exc)
    return render_error(error, headers)


def _bad_request(exc: HTTPException) -> ProxyError:
    """A 4xx from Litestar; a parameter validation failure names its parameter."""
    extra = exc.extra
    first = extra[0] if isinstance(extra, list) and extra else None
    key = first.get("key") if isinstance(first, dict) else None
    if isinstance(key, str) and key:
        return BadRequest(f"Invalid value for {key}", param=key)
    missing = _MISSING_PARAMETER.match(exc.detail)
    if missing:
        return BadRequest(
            f"Missing required parameter: {missing[1]}",
            param=missing[1],
            code="missing_required_parameter",
        )
    return BadRequest("Malformed request")


# Litestar's wording for a required query/header/cookie parameter that was not sent.
_MISSING_PARAMETER = re.compile(r"Missing required \w+ parameter '([^']{1,100})'")


def handle_internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    return internal_error(request.scope, exc)


def internal_error(scope: Any, exc: Exception) -> Response[bytes]:
    """A 500 that tells the client nothing; the traceback is logged with the request id."""
    log.error(
        "unhandled error on %s %s (request id %s)",
        scope.get("method"),
        scope.get("path"),
        scope.get("state", {}).get("request_id"),
        exc_info=exc,
    )
    return render_error(InternalError())


# --- the app ----------------------------------------------------------------------------------


@asynccontextmanager
async def _frozen(app: Litestar) -> AsyncIterator[None]:
    """Keep what startup built, which lives as long as the process, out of full collections.

    A full pass of the cyclic collector over it paused every request in flight for about 40 ms on
    the benchmark's machine; frozen, a pass takes about 1 ms (the benchmark's README, variant
    `gcunfrozen`). Last of the lifespans, so everything they built is frozen too.
    """
    gc.collect()
    gc.freeze()
    yield


def create_app(
    settings: Settings, *, http_client: httpx.AsyncClient | None = None, freeze: bool = False
) -> Litestar:
    """The app; `freeze` (serve's workers) freezes the startup heap (`_frozen`)."""
    from proxy import mcphttp
    from proxy.routes import admin, chat, direct, health, lifecycle, passthrough, sessions
    from proxy.routes import metrics as metrics_route

    # The MCP server starts after the runtime its tools use, and stops before it closes.
    lifespans: list[Any] = [_lifespan(settings, http_client), mcphttp.lifespan, metrics.lifespan]
    if freeze:
        lifespans.append(_frozen)
    app = Litestar(
        route_handlers=[
            *health.handlers,
            *metrics_route.handlers,
            *admin.handlers,
            *sessions.handlers,
            *lifecycle.handlers,
            *chat.handlers,
            *mcphttp.handlers,
            *passthrough.handlers,
        ],
        lifespan=lifespans,
        exception_handlers={
            ProxyError: handle_proxy_error,
            HTTPException: handle_http_exception,
            Exception: handle_internal_error,
        },
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="chatproxy",
            version="0.1.0",
            description=openapi.DESCRIPTION,
            components=openapi.components(),
            path="/schema",
            render_plugins=[SwaggerRenderPlugin(path="/")],
        ),
        logging_config=None,
        debug=False,
    )
    # The chat route answered ahead of routing (proxy/routes/direct.py); the access log outside
    # routing and error handling, so unknown routes and errors get a request id and a line.
    app.asgi_handler = logs.access_log(direct.chat_first(app, app.asgi_handler))
    return app


def app_from_env() -> Litestar:
    """The uvicorn factory used by `chatproxy serve` (each worker builds its own app)."""
    return create_app(load_settings(os.environ), freeze=True)
