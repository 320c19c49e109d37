"""Prometheus metrics: their definitions, the recording calls, and the `/metrics` rendering.

Other modules record through the small functions below (`request`, `upstream_latency`,
`stream_ttfb`, `history`, `turn_stored`, `replay`, `retention_deleted`, `summary_job`,
`overflow_retry`, `observe_pool`); none of them ever takes a key, a user name or message text,
and every label has a bounded set of values (a route template, an HTTP method, a status code,
an upstream's configured name, an outcome, at most 100 model names).

One process (the default): metrics live in prometheus-client's default registry. Several
workers: `chatproxy serve --workers N` points `PROMETHEUS_MULTIPROC_DIR` at a fresh private
directory (`multiprocess_dir`) before the workers start, each worker writes its values there,
and a scrape answered by any worker adds them all up. prometheus-client decides between the two
when it is first imported, so the variable must be set before a worker imports this module.

The pool gauges are read from the worker's asyncpg pool at scrape time; with several workers each
worker also refreshes its own every few seconds (`lifespan`), and the gauges of a worker that
died are dropped at the next scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from proxy.db import pid_alive

log = logging.getLogger("chatproxy.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
# The classic text format every Prometheus reads (the HTTP layer adds "; charset=utf-8").
MEDIA_TYPE = "text/plain; version=0.0.4"
DIR_PREFIX = "chatproxy-metrics-"
POOL_REFRESH_SECONDS = 5.0

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # the route label of a request no route matched (404 / 405)

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)
TTFB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)
MESSAGE_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
TOKEN_BUCKETS = (0, 100, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 256000)


class PoolLike(Protocol):
    """What the pool gauges read (proxy/pool.py)."""

    def get_size(self) -> int: ...
    def get_idle_size(self) -> int: ...
    def get_max_size(self) -> int: ...


@dataclass(frozen=True)
class _Metrics:
    requests: Counter
    request_seconds: Histogram
    upstream_seconds: Histogram
    stream_ttfb_seconds: Histogram
    history_messages: Histogram
    history_tokens: Histogram
    history_dropped: Histogram
    turns: Counter
    replays: Counter
    pool_size: Gauge
    pool_in_use: Gauge
    pool_max: Gauge
    retention_sessions: Counter
    retention_messages: Counter
    summary_jobs: Counter
    overflow_retries: Counter
    retry_models: set[str]


@functools.cache
def _metrics() -> _Metrics:
    """Defined on first use, once per process, in the default registry."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return _Metrics(
        requests=Counter(
            "chatproxy_requests", "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
        ),
        request_seconds=Histogram(
            "chatproxy_request_duration_seconds",
            "Time from receiving a request to the end of its response (streams included)",
            ["route", "method"], buckets=LATENCY_BUCKETS,
        ),
        upstream_seconds=Histogram(
            "chatproxy_upstream_duration_seconds",
            "Time from sending a request upstream to the upstream's response headers",
            ["upstream", "status"], buckets=LATENCY_BUCKETS,
        ),
        stream_ttfb_seconds=Histogram(
            "chatproxy_stream_ttfb_seconds",
            "Streamed chat completions: time from the request to the first byte relayed",
            ["upstream"], buckets=TTFB_BUCKETS,
        ),
        history_messages=Histogram(
            "chatproxy_history_messages_injected",
            "Stored messages injected into one turn's request", buckets=MESSAGE_BUCKETS,
        ),
        history_tokens=Histogram(
            "chatproxy_history_tokens_injected",
            "Tokens of the history injected into one turn's request", buckets=TOKEN_BUCKETS,
        ),
        history_dropped=Histogram(
            "chatproxy_history_messages_dropped",
            "Stored messages left out of one turn's request for the token budget",
            buckets=MESSAGE_BUCKETS,
        ),
        turns=Counter(
            "chatproxy_turns_stored", "Turns written to a session, by reply status",
            ["status"],
        ),
        replays=Counter(
            "chatproxy_idempotent_replays",
            "Responses served again for a repeated Idempotency-Key, without an upstream call",
        ),
        pool_size=Gauge(
            "chatproxy_db_pool_size", "Open database connections in the pools",
            multiprocess_mode="livesum",
        ),
        pool_in_use=Gauge(
            "chatproxy_db_pool_in_use", "Database connections currently lent out by the pools",
            multiprocess_mode="livesum",
        ),
        pool_max=Gauge(
            "chatproxy_db_pool_max", "Most connections the pools may open",
            multiprocess_mode="livesum",
        ),
        retention_sessions=Counter(
            "chatproxy_retention_deleted_sessions",
            "Sessions deleted by the retention job (inactive, or soft-deleted and expired)",
        ),
        retention_messages=Counter(
            "chatproxy_retention_deleted_messages",
            "Messages deleted by the retention job (with their sessions, or pruned)",
        ),
        summary_jobs=Counter(
            "chatproxy_summary_jobs",
            "Summary jobs by outcome: stored, failed, busy (another process had the session's "
            "job), skipped (backing off, or nothing to do)",
            ["outcome"],
        ),
        overflow_retries=Counter(
            "chatproxy_overflow_retries",
            "Turns sent again with less history after the upstream refused their context size",
            ["model"],
        ),
        retry_models=set(),
    )


# --- recording ----------------------------------------------------------------------------


def request(route: str | None, method: str, status: int, seconds: float) -> None:
    """One answered HTTP request; `route` is the matched template (None: no route matched)."""
    m = _metrics()
    label_route = route or UNMATCHED
    label_method = method if method in METHODS else "other"
    m.requests.labels(label_route, label_method, str(status)).inc()
    m.request_seconds.labels(label_route, label_method).observe(seconds)


def upstream_latency(seconds: float, status: int, upstream: str = "default") -> None:
    """The upstream answered (its response headers arrived) `seconds` after it was called."""
    _metrics().upstream_seconds.labels(upstream, str(status)).observe(seconds)


def stream_ttfb(seconds: float, upstream: str = "default") -> None:
    """A streamed reply's first byte reached the client `seconds` after the request arrived."""
    _metrics().stream_ttfb_seconds.labels(upstream).observe(seconds)


def history(injected: int, tokens: int, dropped: int) -> None:
    """One session turn's history: messages and tokens injected, messages dropped."""
    m = _metrics()
    m.history_messages.observe(injected)
    m.history_tokens.observe(tokens)
    m.history_dropped.observe(dropped)


def turn_stored(status: str) -> None:
    """A turn was written; `status` is its reply's status, "complete" or "incomplete"."""
    _metrics().turns.labels(status).inc()


def replay() -> None:
    """An Idempotency-Key retry was answered from the stored response."""
    _metrics().replays.inc()


def retention_deleted(sessions: int, messages: int) -> None:
    """One retention run (or batch) deleted these many sessions and messages."""
    m = _metrics()
    if sessions:
        m.retention_sessions.inc(sessions)
    if messages:
        m.retention_messages.inc(messages)


def summary_job(outcome: str) -> None:
    """A summary job ended: "stored", "failed", "busy" or "skipped"."""
    _metrics().summary_jobs.labels(outcome).inc()


MAX_RETRY_MODELS = 100  # distinct model labels on the retry counter; the rest count as "other"


def overflow_retry(model: object) -> None:
    """A turn was sent again with less history after a context-size refusal.

    Only models an upstream served and refused as too long get here, so the labels stay few;
    past MAX_RETRY_MODELS of them, the rest are counted as "other".
    """
    m = _metrics()
    label = model if isinstance(model, str) and len(model) <= 200 else "other"
    if label not in m.retry_models:
        if len(m.retry_models) >= MAX_RETRY_MODELS:
            label = "other"
        else:
            m.retry_models.add(label)
    m.overflow_retries.labels(label).inc()


def observe_pool(pool: PoolLike) -> None:
    """Copy this process's pool figures into the pool gauges."""
    m = _metrics()
    size = pool.get_size()
    m.pool_size.set(size)
    m.pool_in_use.set(max(size - pool.get_idle_size(), 0))
    m.pool_max.set(pool.get_max_size())


# --- rendering ----------------------------------------------------------------------------


def render() -> bytes:
    """The text exposition of every metric (all workers' when several share a directory)."""
    _metrics()  # a scrape before any request still lists every metric
    directory = os.environ.get(ENV)
    if not directory:
        return generate_latest(REGISTRY)
    _forget_dead_workers(Path(directory))
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def _forget_dead_workers(directory: Path) -> None:
    """Drop the live gauges of workers that died without saying so (a crash, a kill)."""
    pids = {
        int(match.group(1))
        for path in directory.glob("gauge_live*.db")
        if (match := _LIVE_GAUGE_FILE.match(path.name))
    }
    for pid in pids:
        if not pid_alive(pid):
            multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """A Litestar lifespan entered after the one that builds `app.state.rt`.

    With several workers, keeps this worker's pool gauges fresh (a scrape reaches only one
    worker) and removes them when the worker stops. With one process it does nothing: the
    scrape reads the pool itself.
    """
    if not os.environ.get(ENV):
        yield
        return

    async def refresh() -> None:
        while True:
            observe_pool(app.state.rt.pool)
            await asyncio.sleep(POOL_REFRESH_SECONDS)

    task = asyncio.create_task(refresh(), name="chatproxy-pool-gauges")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


# --- the multiprocess directory, for `chatproxy serve` -----------------------------------------


@contextlib.contextmanager
def multiprocess_dir(workers: int) -> Iterator[Path | None]:
    """With several workers, a fresh private PROMETHEUS_MULTIPROC_DIR for as long as they serve.

    Set before the workers start (they inherit it) and removed afterwards, with whatever directories
    earlier servers that died left behind. With one worker nothing changes: the default registry.
    """
    if workers <= 1:
        yield None
        return
    _remove_stale_dirs(Path(tempfile.gettempdir()))
    path = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
    previous = os.environ.get(ENV)
    os.environ[ENV] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


_DIR_NAME = re.compile(rf"^{re.escape(DIR_PREFIX)}(\d+)-\w+$")


def _remove_stale_dirs(parent: Path) -> None:
    """Remove our metrics directories whose server process is gone."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    for path in parent.glob(DIR_PREFIX + "*"):
        match = _DIR_NAME.match(path.name)
        if match is None or not path.is_dir() or path.is_symlink():
            continue
        if uid is not None and path.stat().st_uid != uid:
            continue
        if not pid_alive(int(match.group(1))):
            log.info("removing stale metrics directory %s", path)
            shutil.rmtree(path, ignore_errors=True)
