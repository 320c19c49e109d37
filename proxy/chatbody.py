"""A chat completion request's body, checked: its session, its history window, its messages.

What the proxy itself reads of the body, and nothing else: `session_id` (or the X-Session-Id
header) and `max_history_messages` are taken out (they never go upstream); `messages` must have
the shapes a stored message needs to go upstream again as history. Every other field goes
upstream as the client sent it. Each failure is a 400 naming its field.
"""

from __future__ import annotations

from typing import Any

from proxy.errors import BadRequest, SessionNotFound
from proxy.ids import is_session_id
from proxy.rawrequest import Headers
from proxy.schemas import MAX_HISTORY_MESSAGES, ROLES

PROXY_FIELDS = ("session_id", "max_history_messages")


def session_id(headers: Headers, body: dict[str, Any]) -> str | None:
    """The session the request names (body or header), taken out of the body."""
    in_body = body.pop("session_id", None)
    in_header = headers.get("x-session-id")
    if in_body is not None and not isinstance(in_body, str):
        raise BadRequest("session_id must be a string", param="session_id")
    if in_body is not None and in_header is not None and in_body != in_header:
        raise BadRequest(
            "session_id in the body and the X-Session-Id header differ", param="session_id"
        )
    value = in_body if in_body is not None else in_header
    if value is not None and not is_session_id(value):
        # Names no session; PostgreSQL could not even take some such strings (NUL, surrogates).
        raise SessionNotFound(value)
    return value


def history_override(body: dict[str, Any]) -> int | None:
    """The request's own history window, taken out of the body."""
    value = body.pop("max_history_messages", None)
    if value is None:
        return None
    if (not isinstance(value, int) or isinstance(value, bool)
            or not 0 <= value <= MAX_HISTORY_MESSAGES):
        raise BadRequest(
            f"max_history_messages must be an integer between 0 and {MAX_HISTORY_MESSAGES}",
            param="max_history_messages",
        )
    return value


def check_messages(body: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The request's messages, each checked (at most `limit` of them)."""
    items = body.get("messages")
    if not isinstance(items, list):
        raise BadRequest("messages must be an array", param="messages",
                         code="missing_required_parameter" if items is None else "invalid_value")
    if not items:
        raise BadRequest("messages must hold at least one message", param="messages")
    if len(items) > limit:
        raise BadRequest(f"At most {limit} messages per request", param="messages")
    for index, item in enumerate(items):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise BadRequest("Each message must be an object", param=where)
        role = item.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(
                f"{where}.role must be one of {', '.join(sorted(ROLES))}", param=f"{where}.role"
            )
        _check_message_fields(item, where)
    return items


def _check_message_fields(item: dict[str, Any], where: str) -> None:
    """The shapes a stored message must have to be sent upstream again as history."""
    content = item.get("content")
    if not (content is None or isinstance(content, str) or (
        isinstance(content, list) and all(isinstance(part, dict) for part in content)
    )):
        raise BadRequest(f"{where}.content must be a string, an array of content parts or null",
                         param=f"{where}.content")
    for name in ("name", "tool_call_id"):
        if name in item and not isinstance(item[name], str):
            raise BadRequest(f"{where}.{name} must be a string", param=f"{where}.{name}")
    calls = item.get("tool_calls")
    if calls is not None and not (
        isinstance(calls, list) and all(isinstance(call, dict) for call in calls)
    ):
        raise BadRequest(f"{where}.tool_calls must be an array of objects",
                         param=f"{where}.tool_calls")
