"""The export document, `chatproxy.session.v1`: how a session is written out and read back.

    {"format": "chatproxy.session.v1", "session": {...session object...}, "messages": [...]}

A message is written as its message object (contract §5) with, beside `role` and `content`,
every other field its stored body holds (`function_call`, `audio`, a `name` that is null...), so
that importing it stores the same message. Keys that name the envelope (`id`, `object`,
`session_id`, `seq`, `tokens`, `status`, `created_at`) are never part of a stored message.

`parse` validates a whole document before anything is written: the first problem is a
`BadRequest` whose `param` names the field (`messages[3].role`), and nothing is created.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from proxy import codec
from proxy.errors import BadRequest
from proxy.timefmt import iso

FORMAT = "chatproxy.session.v1"
ENVELOPE = frozenset({"id", "object", "session_id", "seq", "tokens", "status", "created_at"})
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
STATUSES = frozenset({"complete", "incomplete"})
MAX_TOKENS = 2**31 - 1
MAX_METADATA = 64


# --- writing ----------------------------------------------------------------------------------


def head(session: dict[str, Any]) -> bytes:
    """The document up to the opening bracket of its messages."""
    opening = b'{"format":"' + FORMAT.encode() + b'","session":'
    return opening + codec.dumps(session) + b',"messages":['


TAIL = b"]}"


def message(
    session_id: str, msg_id: int, seq: int, role: str, body: str, tokens: int, status: str,
    created_at: datetime,
) -> dict[str, Any]:
    """One stored message as the document writes it."""
    stored = codec.loads(body)
    result: dict[str, Any] = {
        "id": f"msg_{msg_id}",
        "object": "chat.message",
        "session_id": session_id,
        "seq": seq,
        "role": role,
        "content": stored.get("content"),
    }
    for key, value in stored.items():
        if key not in result and key not in ENVELOPE:
            result[key] = value
    result["tokens"] = tokens
    result["status"] = status
    result["created_at"] = iso(created_at)
    return result


# --- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """A validated message of a document, as it will be stored."""

    body: dict[str, Any]
    tokens: int
    status: str
    created_at: datetime | None

    @property
    def role(self) -> str:
        return str(self.body["role"])

    @property
    def has_tool_calls(self) -> bool:
        return self.role == "assistant" and bool(self.body.get("tool_calls"))


@dataclass(frozen=True, slots=True)
class Document:
    """A validated document: the new session's settings and its messages, in order."""

    fields: dict[str, Any]
    messages: list[Message]


TokenCount = Callable[[Any, dict[str, Any]], int]


def _bad(param: str, reason: str) -> BadRequest:
    return BadRequest(f"Invalid value for {param}: {reason}", param=param)


def _missing(param: str) -> BadRequest:
    return BadRequest(
        f"Missing required parameter: {param}", param=param, code="missing_required_parameter"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_str(data: dict[str, Any], key: str, where: str, max_length: int | None) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"{where}.{key}", "expected a string or null")
    if max_length is not None and len(value) > max_length:
        raise _bad(f"{where}.{key}", f"at most {max_length} characters")
    return value


def _opt_int(data: dict[str, Any], key: str, where: str, low: int, high: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if not _is_int(value) or not low <= value <= high:
        raise _bad(f"{where}.{key}", f"expected an integer between {low} and {high}")
    return int(value)


def _session(data: Any, default_max_history: int) -> dict[str, Any]:
    if data is None:
        raise _missing("session")
    if not isinstance(data, dict):
        raise _bad("session", "expected an object")
    metadata = data.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad("session.metadata", "expected an object of strings")
    if len(metadata) > MAX_METADATA:
        raise _bad("session.metadata", f"at most {MAX_METADATA} entries")
    max_history = _opt_int(data, "max_history_messages", "session", 0, 1000)
    return {
        "session_name": _opt_str(data, "session_name", "session", 1000),
        "model": _opt_str(data, "model", "session", 200),
        "system_prompt": _opt_str(data, "system_prompt", "session", None),
        "max_history_messages": default_max_history if max_history is None else max_history,
        "max_history_tokens": _opt_int(data, "max_history_tokens", "session", 0, 100_000_000),
        "metadata": metadata,
    }


def _timestamp(value: Any, param: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(param, "expected an ISO 8601 timestamp")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _bad(param, "expected an ISO 8601 timestamp") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _message(item: Any, where: str, model: Any, count: TokenCount) -> tuple[Message, Any]:
    if not isinstance(item, dict):
        raise _bad(where, "expected an object")
    role = item.get("role")
    if role is None:
        raise _missing(f"{where}.role")
    if role not in ROLES:
        raise _bad(f"{where}.role", f"expected one of {', '.join(sorted(ROLES))}")
    if "content" not in item:
        raise _missing(f"{where}.content")
    if item["content"] is not None and not isinstance(item["content"], str | list):
        raise _bad(f"{where}.content", "expected a string, an array or null")
    tool_calls = item.get("tool_calls")
    if tool_calls is not None and (
        not isinstance(tool_calls, list) or not all(isinstance(c, dict) for c in tool_calls)
    ):
        raise _bad(f"{where}.tool_calls", "expected an array of objects")
    _opt_str(item, "tool_call_id", where, None)
    _opt_str(item, "name", where, None)
    status = item.get("status", "complete")
    if status not in STATUSES:
        raise _bad(f"{where}.status", "expected complete or incomplete")
    seq = item.get("seq")
    if seq is not None and not _is_int(seq):
        raise _bad(f"{where}.seq", "expected an integer")
    body = {"role": role, "content": item["content"]}
    body.update((k, v) for k, v in item.items() if k not in ENVELOPE and k not in body)
    tokens = _opt_int(item, "tokens", where, 0, MAX_TOKENS)
    if tokens is None:
        tokens = count(model, body)
    created_at = _timestamp(item.get("created_at"), f"{where}.created_at")
    return Message(body, tokens, str(status), created_at), seq


def parse(doc: Any, default_max_history: int, count: TokenCount) -> Document:
    """A whole document, validated; `count(model, message)` fills in missing token counts."""
    if not isinstance(doc, dict):
        raise BadRequest("The export document must be a JSON object", code="invalid_value")
    if "format" not in doc:
        raise _missing("format")
    if doc["format"] != FORMAT:
        raise _bad("format", f"expected {FORMAT!r}")
    fields = _session(doc.get("session"), default_max_history)
    items = doc.get("messages")
    if items is None:
        raise _missing("messages")
    if not isinstance(items, list):
        raise _bad("messages", "expected an array")
    result: list[Message] = []
    previous: int | None = None
    for index, item in enumerate(items):
        where = f"messages[{index}]"
        parsed, seq = _message(item, where, fields["model"], count)
        if seq is not None:
            if previous is not None and seq <= previous:
                raise _bad(f"{where}.seq", "messages must be in increasing seq order")
            previous = seq
        result.append(parsed)
    return Document(fields, result)
