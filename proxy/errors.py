"""Every error the proxy produces, rendered in one place as OpenAI's error envelope.

    ProxyError                      status, type, code, param
     ├── BadRequest                 400 invalid_value (and the other 400 codes)
     ├── Unauthorized               401 invalid_api_key
     ├── Forbidden                  403 insufficient_permissions
     ├── NotFound                   404 not_found
     │    └── SessionNotFound       404 session_not_found
     ├── RequestTimeout             408 request_timeout (no whole request head in time)
     ├── Conflict                   409 conflict / idempotency_key_in_use
     ├── PayloadTooLarge            413 request_too_large
     ├── Unprocessable              422 idempotency_key_reused
     ├── HeaderTooLarge             431 request_header_too_large
     ├── UpstreamError              502 upstream_error
     │    └── EventTooLarge         502 upstream_error (proxy/sse.py)
     ├── DatabaseUnavailable        503 database_unavailable
     ├── ShuttingDown               503 server_shutting_down
     ├── TooManyConnections         503 too_many_connections
     ├── UpstreamTimeout            504 upstream_timeout
     └── InternalError              500 internal_error

The 408, 431 and 503 `too_many_connections` are written by the server's connection guard
(proxy/server.py) before any request reaches the app.

Messages never carry internals: no exception text, key, SQL or message content.
"""

from __future__ import annotations

from typing import Any

import msgspec


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
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
        shown = session_id if _looks_like_id(session_id) else "(malformed id)"
        super().__init__(f"Session {shown} not found", param=param)


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


class UpstreamError(ProxyError):
    status, type, code = 502, "server_error", "upstream_error"


class DatabaseUnavailable(ProxyError):
    status, type, code = 503, "server_error", "database_unavailable"

    def __init__(self, message: str = "The database is unavailable, try again shortly"):
        super().__init__(message)


class ShuttingDown(ProxyError):
    """A request still running when the server's shutdown grace ran out."""

    status, type, code = 503, "server_error", "server_shutting_down"

    def __init__(self, message: str = "The server is shutting down, try again"):
        super().__init__(message)


class RequestTimeout(ProxyError):
    status, type, code = 408, "invalid_request_error", "request_timeout"

    def __init__(self, message: str = "The request head did not arrive in time"):
        super().__init__(message)


class HeaderTooLarge(ProxyError):
    status, type, code = 431, "invalid_request_error", "request_header_too_large"

    def __init__(self, message: str = "The request head is too large"):
        super().__init__(message)


class TooManyConnections(ProxyError):
    status, type, code = 503, "server_error", "too_many_connections"

    def __init__(self, message: str = "The server has too many open connections, try again"):
        super().__init__(message)


class UpstreamTimeout(ProxyError):
    status, type, code = 504, "server_error", "upstream_timeout"


class InternalError(ProxyError):
    def __init__(self, message: str = "Internal server error"):
        super().__init__(message)


def error_body(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_bytes(error: ProxyError) -> bytes:
    return msgspec.json.encode(error.body())


def _looks_like_id(value: str) -> bool:
    return 0 < len(value) <= 64 and value.isascii() and value.replace("_", "").isalnum()
