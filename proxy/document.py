"""The export document, `chatproxy.session.v1`: how a session is written out and read back.

    {"format": "chatproxy.session.v1", "session": {...session object...},
     "summary": {"text", "up_to_seq", "tokens", "model", "updated_at"} | null, "messages": [...]}

A message is written as its message object (contract §5) with, beside `role` and `content`,
every other field its stored body holds (`store.messages.message_object(..., whole=True)`), so
that importing it stores the same message. The keys that name the envelope (`id`, `object`,
`session_id`, `seq`, `tokens`, `status`, `created_at`) are never part of a stored message.

`parse` validates a whole document with `schemas.ImportDocument` before anything is written:
the first problem is a `BadRequest` whose `param` names the field (`messages[3].role`), and
nothing is created. The text stored is the document's own, exactly (lone surrogates and NULs
included). Pure: no I/O.

The summary (contract §11) is the session's summary of its earlier messages: `up_to_seq` names
the last message it covers, in the document's seqs; an import renumbers messages 1..n, and the
summary's `up_to_seq` with them. `Summary` and `summary_message` are its value and the system
message a turn carries it in, wherever a summary is read, written or counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from proxy import codec
from proxy.errors import BadRequest
from proxy.schemas import (
    FORMAT,
    MAX_HISTORY_MESSAGES,
    MAX_HISTORY_TOKENS,
    MAX_TOKENS,
    MESSAGE_ENVELOPE,
    ROLES,
    ImportDocument,
)
from proxy.timefmt import iso
from proxy.validation import validated

SUMMARY_PREFIX = "Summary of the earlier conversation:\n"


@dataclass(frozen=True, slots=True)
class Summary:
    """A session's summary: its text, the last seq it covers, what it costs in a turn (the
    tokens of `summary_message`), the model that wrote it and when."""

    text: str
    up_to_seq: int
    tokens: int
    model: str | None
    updated_at: datetime | None

    def as_object(self) -> dict[str, Any]:
        return {"text": self.text, "up_to_seq": self.up_to_seq, "tokens": self.tokens,
                "model": self.model, "updated_at": iso(self.updated_at)}


def summary_message(text: str) -> dict[str, Any]:
    """The one system message a turn carries a summary in, right after its head."""
    return {"role": "system", "content": SUMMARY_PREFIX + text}


# --- writing ----------------------------------------------------------------------------------


def head(session: dict[str, Any], summary: dict[str, Any] | None = None) -> bytes:
    """The document up to the opening bracket of its messages."""
    opening = b'{"format":"' + FORMAT.encode() + b'","session":'
    return (opening + codec.dumps(session) + b',"summary":' + codec.dumps(summary)
            + b',"messages":[')


TAIL = b"]}"


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
    summary: Summary | None = None


TokenCount = Callable[[Any, dict[str, Any]], int]
SETTINGS = ("session_name", "model", "system_prompt", "max_history_messages",
            "max_history_tokens", "metadata")


def parse(doc: Any, default_max_history: int, count: TokenCount) -> Document:
    """A whole document, validated; `count(model, message)` fills in missing token counts."""
    if not isinstance(doc, dict):
        raise BadRequest("The export document must be a JSON object", code="invalid_value")
    try:
        checked = validated(ImportDocument, doc)
    except ValidationError as exc:
        raise _refusal(exc) from None
    # The text comes from the document itself, the numbers and times from the model.
    session = doc["session"]
    fields = {name: session.get(name) for name in SETTINGS}
    if fields["max_history_messages"] is None:
        fields["max_history_messages"] = default_max_history
    fields["metadata"] = fields["metadata"] or {}
    result: list[Message] = []
    previous: int | None = None
    for index, (item, message) in enumerate(zip(doc["messages"], checked.messages, strict=True)):
        if message.seq is not None:
            if previous is not None and message.seq <= previous:
                raise _bad(f"messages[{index}].seq", "messages must be in increasing seq order")
            previous = message.seq
        body = {"role": item["role"], "content": item["content"]}
        body.update((k, v) for k, v in item.items() if k not in MESSAGE_ENVELOPE and k not in body)
        tokens = message.tokens if message.tokens is not None else count(fields["model"], body)
        result.append(Message(body, tokens, message.status, message.created_at))
    summary = None
    if checked.summary is not None:
        summary = _summary(doc["summary"], checked, fields["model"], count)
    return Document(fields, result, summary)


def _summary(raw: dict[str, Any], checked: ImportDocument, model: Any,
             count: TokenCount) -> Summary:
    """The document's summary, its `up_to_seq` moved to the seqs the import gives (1..n)."""
    given = checked.summary
    assert given is not None
    seqs = [(at, m.seq) for at, m in enumerate(checked.messages, 1) if m.seq is not None]
    if seqs:  # the last imported message it covers, by the document's own seqs
        up_to = max((at for at, seq in seqs if seq <= given.up_to_seq), default=0)
    elif given.up_to_seq <= len(checked.messages):  # no seqs: positions
        up_to = given.up_to_seq
    else:
        raise _bad("summary.up_to_seq", f"expected at most {len(checked.messages)} (the "
                   "document's messages)")
    text = raw["text"]  # the document's own text, exactly
    tokens = given.tokens if given.tokens is not None else count(model, summary_message(text))
    model_name = raw.get("model")
    return Summary(text, up_to, tokens, model_name if isinstance(model_name, str) else None,
                   given.updated_at)


# --- the first problem, worded as the document format always has --------------------------------

# Why a field's value is refused, by field name (a message of `messages` has its own below).
_REASONS = {
    "format": f"expected {FORMAT!r}",
    "session": "expected an object",
    "messages": "expected an array",
    "session_name": "expected a string or null",
    "model": "expected a string or null",
    "system_prompt": "expected a string or null",
    "max_history_messages": f"expected an integer between 0 and {MAX_HISTORY_MESSAGES}",
    "max_history_tokens": f"expected an integer between 0 and {MAX_HISTORY_TOKENS}",
    "metadata": "expected an object of strings",
    "role": f"expected one of {', '.join(sorted(ROLES))}",
    "content": "expected a string, an array or null",
    "tool_calls": "expected an array of objects",
    "tool_call_id": "expected a string or null",
    "name": "expected a string or null",
    "status": "expected complete or incomplete",
    "seq": "expected an integer",
    "tokens": f"expected an integer between 0 and {MAX_TOKENS}",
    "created_at": "expected an ISO 8601 timestamp (in UTC, from year 1 to 9999)",
    "summary": "expected an object or null",
    "text": "expected a string",
    "up_to_seq": "expected an integer >= 0",
    "updated_at": "expected an ISO 8601 timestamp (in UTC, from year 1 to 9999)",
}
_TOO_LONG = {"session_name": "characters", "model": "characters", "metadata": "entries"}
# Required fields for which null counts as left out.
_NULL_IS_MISSING = frozenset({"session", "messages", "role"})


def _refusal(exc: ValidationError) -> BadRequest:
    error = exc.errors()[0]
    loc = error["loc"]
    # Down to the field the problem is about: `session.<field>`, `messages[i].<field>`.
    depth = 3 if loc[0] == "messages" else 2
    parts = loc[:depth]
    param = str(parts[0]) + "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts[1:]
    )
    name = parts[-1]
    if error["type"] == "missing" or (error.get("input", 0) is None and name in _NULL_IS_MISSING):
        return BadRequest(
            f"Missing required parameter: {param}", param=param,
            code="missing_required_parameter",
        )
    if isinstance(name, int):
        return _bad(param, "expected an object")
    unit = _TOO_LONG.get(name)
    if unit is not None and error["type"] in ("string_too_long", "too_long"):
        return _bad(param, f"at most {error['ctx']['max_length']} {unit}")
    return _bad(param, _REASONS[name])


def _bad(param: str, reason: str) -> BadRequest:
    return BadRequest(f"Invalid value for {param}: {reason}", param=param)
