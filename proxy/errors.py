"""Every error the proxy produces, and the one place that renders it as OpenAI's error envelope.

    ProxyError                      status, type, code, param
     ├── BadRequest                 400 invalid_value (and the other 400 codes)
     ├── Unauthorized               401 invalid_api_key
     ├── Forbidden                  403 insufficient_permissions
     ├── NotFound                   404 not_found
     │    ├── SessionNotFound       404 session_not_found
     │    │    └── SessionGone      404 session_not_found (deleted while a turn ran)
     │    └── ObjectNotFound        404 not_found (a conversation, a response, an item)
     ├── MethodNotAllowed           405 method_not_allowed
     ├── RequestTimeout             408 request_timeout (no whole request head in time)
     ├── Conflict                   409 conflict / idempotency_key_in_use
     ├── PayloadTooLarge            413 request_too_large
     ├── Unprocessable              422 idempotency_key_reused
     ├── TooManyRequests            429 rate_limit_exceeded (a user's exports, proxy/exports.py)
     ├── HeaderTooLarge             431 request_header_too_large
     ├── UpstreamError              502 upstream_error
     │    └── EventTooLarge         502 upstream_error (proxy/sse.py)
     ├── DatabaseUnavailable        503 database_unavailable
     ├── ShuttingDown               503 server_shutting_down
     ├── UpstreamBusy               503 upstream_busy
     ├── TooManyConnections         503 too_many_connections
     ├── UpstreamTimeout            504 upstream_timeout
     └── InternalError              500 internal_error

The 408, 431 and 503 `too_many_connections` are written by the server's connection guard
(proxy/server.py) before any request reaches the app.

Messages never carry internals: no exception text, key, SQL or message content.

Rendering: `render_error` is the response of any `ProxyError`; `internal_error` is the 500 for
anything else (its traceback logged with the request id, nothing told to the client);
`handlers()` is the app's exception-handler map, which also puts Litestar's own errors (routing,
body size, parameter validation) in the envelope.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from proxy.ids import is_object_id, is_session_id

log = logging.getLogger("chatproxy")


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    message = "Internal server error"  # the message when none is given

    def __init__(
        self, message: str | None = None, *, param: str | None = None, code: str | None = None
    ):
        message = self.message if message is None else message
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


class BadRequest(ProxyError):
    status, type, code = 400, "invalid_request_error", "invalid_value"


class Unauthorized(ProxyError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class Forbidden(ProxyError):
    status, type, code = 403, "invalid_request_error", "insufficient_permissions"


class NotFound(ProxyError):
    status, type, code = 404, "invalid_request_error", "not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"

    def __init__(self, session_id: str, *, param: str | None = "session_id"):
        # The id is echoed only when it has the shape of ours, so hostile text is never reflected.
        shown = session_id if is_session_id(session_id) else "(malformed id)"
        super().__init__(f"Session {shown} not found", param=param)


class SessionGone(SessionNotFound):
    """The session was deleted (or merged into another) while a turn on it ran: the turn's
    write found it inactive and stored nothing."""

    def __init__(self, session_id: str):
        super().__init__(session_id)
        shown = self.message.removeprefix("Session ").removesuffix(" not found")
        self.message = f"Session {shown} was deleted while this turn ran; the turn was not stored"


class ObjectNotFound(NotFound):
    """A conversation, a response or an item that is not the caller's (or is no more)."""

    def __init__(self, kind: str, object_id: str, *, param: str | None):
        shown = object_id if is_object_id(object_id) else "(malformed id)"
        super().__init__(f"{kind} {shown} not found", param=param)


class ConversationGone(ObjectNotFound):
    """A conversation deleted (or merged away) while a response in it ran: neither the response
    nor its turn was stored."""

    def __init__(self, conversation_id: str):
        super().__init__("Conversation", conversation_id, param="conversation")
        shown = self.message.removeprefix("Conversation ").removesuffix(" not found")
        self.message = (f"Conversation {shown} was deleted while this response ran; "
                        "the response was not stored")


def unknown_route(method: str, path: str) -> NotFound:
    """The one 404 for a path the proxy does not serve (a disabled admin API included)."""
    return NotFound(f"Unknown route: {method} {path}")


class MethodNotAllowed(ProxyError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class Conflict(ProxyError):
    status, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(ProxyError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class Unprocessable(ProxyError):
    status, type, code = 422, "invalid_request_error", "idempotency_key_reused"


class TooManyRequests(ProxyError):
    status, type, code = 429, "invalid_request_error", "rate_limit_exceeded"


class UpstreamError(ProxyError):
    status, type, code = 502, "server_error", "upstream_error"


class DatabaseUnavailable(ProxyError):
    status, type, code = 503, "server_error", "database_unavailable"
    message = "The database is unavailable, try again shortly"


class UpstreamBusy(ProxyError):
    """Every connection the upstream's origin may have (`upstream_max_connections`) stayed busy
    for the whole wait; the OpenAI SDKs retry a 503."""

    status, type, code = 503, "server_error", "upstream_busy"

    def __init__(self, message: str = "The upstream is busy, try again shortly"):
        super().__init__(message)


# The message a request task is cancelled with when the shutdown grace runs out (proxy/server.py).
SHUTDOWN_CUT = "cut at the shutdown deadline"


class ShuttingDown(ProxyError):
    """A request still running when the server's shutdown grace ran out."""

    status, type, code = 503, "server_error", "server_shutting_down"
    message = "The server is shutting down, try again"


class RequestTimeout(ProxyError):
    status, type, code = 408, "invalid_request_error", "request_timeout"
    message = "The request head did not arrive in time"


class HeaderTooLarge(ProxyError):
    status, type, code = 431, "invalid_request_error", "request_header_too_large"
    message = "The request head is too large"


class TooManyConnections(ProxyError):
    status, type, code = 503, "server_error", "too_many_connections"
    message = "The server has too many open connections, try again"


class UpstreamTimeout(ProxyError):
    status, type, code = 504, "server_error", "upstream_timeout"


class InternalError(ProxyError):
    pass


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_bytes(error: ProxyError) -> bytes:
    return msgspec.json.encode(error.body())



# --- rendering ----------------------------------------------------------------------------------


def render_error(error: ProxyError, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(
        error_bytes(error),
        status_code=error.status,
        media_type="application/json",
        headers=headers,
    )


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


def handlers() -> dict[Any, Any]:
    """The app's exception handlers: every error a response in the envelope."""
    return {
        ProxyError: _proxy_error,
        HTTPException: _http_exception,
        Exception: _internal_error,
    }


def _proxy_error(request: Request[Any, Any, Any], exc: ProxyError) -> Response[bytes]:
    return render_error(exc)


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    return internal_error(request.scope, exc)


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
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
        return _internal_error(request, exc)
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
