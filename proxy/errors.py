"""Every error the proxy produces, rendered in one place as OpenAI's error envelope.

    ProxyError                      status, type, code, param
     ├── BadRequest                 400 invalid_value (and the other 400 codes)
     ├── Unauthorized               401 invalid_api_key
     ├── Forbidden                  403 insufficient_permissions
     ├── NotFound                   404 not_found
     │    └── SessionNotFound       404 session_not_found
     ├── Conflict                   409 conflict / idempotency_key_in_use
     ├── PayloadTooLarge            413 request_too_large
     ├── Unprocessable              422 idempotency_key_reused
     ├── UpstreamError              502 upstream_error
     ├── DatabaseUnavailable        503 database_unavailable
     ├── UpstreamBusy               503 upstream_busy
     ├── UpstreamTimeout            504 upstream_timeout
     └── InternalError              500 internal_error

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


class UpstreamBusy(ProxyError):
    """Every connection the upstream's origin may have (`upstream_max_connections`) stayed busy
    for the whole wait; the OpenAI SDKs retry a 503."""

    status, type, code = 503, "server_error", "upstream_busy"

    def __init__(self, message: str = "The upstream is busy, try again shortly"):
        super().__init__(message)


class ShuttingDown(ProxyError):
    """A request still running when the server's shutdown grace ran out."""

    status, type, code = 503, "server_error", "server_shutting_down"

    def __init__(self, message: str = "The server is shutting down, try again"):
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
