"""create_app(): the lifespan (pool, HTTP client, tokenizer), the routes and the error handlers.

Nothing happens at import. The lifespan owns every collaborator a request uses and puts them on
`app.state.rt` as one `Runtime` (proxy/runtime.py); the error handlers are proxy/errors.py's.
Only the CLI (through uvicorn's factory string) and the tests import this module.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.routes import HTTPRoute

from proxy import db, errors, keylease, logs, metrics, openapi, retention, searchindex
from proxy import summaries as summary_jobs
from proxy.config import Settings, load_settings
from proxy.migrate import migrate
from proxy.runtime import Runtime
from proxy.tokens import ModelTable, TokenCounter
from proxy.upstream import make_client

log = logging.getLogger("chatproxy")


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
            pool.release(conn, discard=True)  # it held a session-level advisory lock
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        log.info("database: %s", db.describe(settings))
        for upstream in settings.all_upstreams():
            log.info("upstream %s: %s", upstream.name, upstream.base_url)
        http = http_client or make_client(settings)
        app.state.rt = rt = Runtime(settings, pool, http, tokens)
        job = asyncio.create_task(retention.run_hourly(pool, settings))  # retention, pruning
        feed = asyncio.create_task(keylease.follow(rt.keys, url))
        # Search words for rows stored before the search index existed (sql/005_search.sql).
        backfill = asyncio.create_task(
            searchindex.run_backfill(pool, settings.db_acquire_timeout))
        try:
            yield
        finally:
            job.cancel()
            feed.cancel()
            backfill.cancel()
            await asyncio.gather(job, feed, backfill, return_exceptions=True)
            await summary_jobs.stop(rt)  # a later turn redoes a summary job
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
    from proxy.mcp import mount as mcphttp
    from proxy.routes import (
        admin,
        chat,
        conversations,
        fastpath,
        health,
        passthrough,
        prometheus,
        responses,
        search,
        session_lifecycle,
        sessions,
        summaries,
        swagger,
        ui,
    )

    # The MCP server starts after the runtime its tools use, and stops before it closes.
    lifespans: list[Any] = [_lifespan(settings, http_client), mcphttp.lifespan, metrics.lifespan]
    if freeze:
        lifespans.append(_frozen)
    app = Litestar(
        route_handlers=[
            *health.handlers,
            *prometheus.handlers,
            *admin.handlers,
            *sessions.handlers,
            *session_lifecycle.handlers,
            *summaries.handlers,
            *search.handlers,
            *ui.handlers,
            *chat.handlers,
            *responses.handlers,
            *conversations.handlers,
            *mcphttp.handlers,
            *passthrough.handlers,
            *swagger.handlers,
        ],
        lifespan=lifespans,
        exception_handlers=errors.handlers(),
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="chatproxy",
            version="0.1.0",
            description=openapi.DESCRIPTION,
            components=openapi.components(),
            path="/schema",
            render_plugins=[swagger.render_plugin()],  # its assets are ours (works offline)
        ),
        logging_config=None,
        debug=False,
    )
    _answer_options_for_whole_paths(app)
    # The chat and responses routes answered ahead of routing (proxy/routes/fastpath.py); the
    # access log outside routing and error handling, so unknown routes and errors get a request
    # id and a line.
    app.asgi_handler = logs.access_log(fastpath.chat_first(
        app, app.asgi_handler, chat.complete, responses=responses.create))
    return app


def _answer_options_for_whole_paths(app: Litestar) -> None:
    """`OPTIONS` on a path answers `Allow` with every method of the path.

    Litestar makes a path's OPTIONS handler with its first route handler, and that handler
    reads the methods of the route as it was then (`GET` alone, say), not of the route the
    path's other handlers were merged into. Each such handler is pointed at its final route.
    """
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            fn = getattr(handler.fn, "__closure__", None)
            if (handler.http_methods == {"OPTIONS"} and fn is not None and len(fn) == 1
                    and isinstance(fn[0].cell_contents, HTTPRoute)):
                fn[0].cell_contents = route


def app_from_env() -> Litestar:
    """The uvicorn factory used by `chatproxy serve` (each worker builds its own app)."""
    return create_app(load_settings(os.environ), freeze=True)
