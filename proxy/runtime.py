"""`Runtime`: everything a request needs, built and owned by the app's lifespan.

The lifespan (proxy/app.py) puts one `Runtime` on `app.state.rt`; handlers reach it through
`runtime(request)`, and everything below the routes takes it as an argument.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx

from proxy import db, keylease
from proxy.config import Settings
from proxy.exports import ExportBudget
from proxy.store import database
from proxy.tokens import TokenCounter

if TYPE_CHECKING:
    from litestar import Request


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
    # Summary jobs this process runs, by session (proxy/summaries.py); None once shutdown has
    # cancelled them (none starts after that).
    summary_jobs: dict[str, asyncio.Task[Any]] | None = field(default_factory=dict)
    # Context windows upstream refusals stated, by user and model (proxy/turns/overflow.py).
    context_limits: dict[tuple[str, str], int] = field(default_factory=dict)
    # Exports reading the database, and each user's under way (proxy/exports.py).
    exports: ExportBudget = field(init=False)

    def __post_init__(self) -> None:
        self.exports = ExportBudget(self.settings.export_connections,
                                    self.settings.exports_per_user)

    def connection(self, *, bulk: bool = False) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A pooled connection (`db.connection`); `bulk` for statements that grow with a
        whole session's rows (import, export, fork, merge, clear, pruning), which get
        `db_bulk_timeout` instead of `db_statement_timeout`, after a round trip within the
        latter (so a request doing bulk work on a hung database is a 503 within seconds)."""
        return db.connection(
            self.pool, self.settings.db_acquire_timeout,
            statement_timeout=self.settings.db_bulk_timeout if bulk else None,
            probe=database.ping if bulk else None,
        )

    def track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)
        return task


def runtime(request: Request[Any, Any, Any]) -> Runtime:
    rt: Runtime = request.app.state.rt
    return rt
