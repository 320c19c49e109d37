"""Text for assistants: each MCP tool result as a few readable lines, a session as Markdown.

A tool answers with `structuredContent` and this text beside it; many hosts hand a model only the
text, so it says what the structure says, message text included (cut at `MAX_SHOWN` characters
a message). The transcript (`chatproxy://sessions/{id}`) is the whole session as Markdown:
roles, tool calls with their arguments, tool results, incomplete replies marked. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_SHOWN = 2000  # characters of one message in a tool's text (the structure has it whole)


def content_text(content: Any) -> str:
    """A message's content as text: a string as it is, the text of an array's text parts, and a
    placeholder such as `[image_url]` for any other part."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return json.dumps(content, ensure_ascii=False)
    pieces = []
    for part in content:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else None
            pieces.append(f"[{kind if isinstance(kind, str) else 'part'}]")
    return "\n".join(pieces)


def _calls(message: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(name, arguments, id) of an assistant message's tool calls."""
    result = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        function = function if isinstance(function, dict) else {}
        name, arguments = function.get("name"), function.get("arguments")
        call_id = call.get("id") if isinstance(call, dict) else None
        result.append((name if isinstance(name, str) else "?",
                       arguments if isinstance(arguments, str) else json.dumps(arguments),
                       call_id if isinstance(call_id, str) else "?"))
    return result


def _cut(text: str) -> str:
    if len(text) <= MAX_SHOWN:
        return text
    return text[:MAX_SHOWN] + f"… [{len(text) - MAX_SHOWN} more characters]"


# --- tool results -----------------------------------------------------------------------------


def session_line(session: dict[str, Any]) -> str:
    name = session["session_name"]
    parts = [
        session["id"],
        json.dumps(name, ensure_ascii=False) if name is not None else "(unnamed)",
        f"model {session['model'] or '(any)'}",
        f"{session['message_count']} messages, {session['total_tokens']} tokens",
        f"last activity {session['last_message_at'] or session['created_at']}",
    ]
    if not session["is_active"]:
        parts.append("DELETED (resume_session restores it)")
    return " · ".join(parts)


def message_line(message: dict[str, Any]) -> str:
    role = message["role"]
    if role == "tool" and message.get("tool_call_id"):
        role += f" (result of {message['tool_call_id']})"
    if message.get("status") == "incomplete":
        role += " [incomplete]"
    lines = [f"[{message['seq']}] {role}: {_cut(content_text(message.get('content')))}"]
    return "\n".join(lines + _call_lines(message))


def _call_lines(message: dict[str, Any]) -> list[str]:
    return [f"    tool call {name}({_cut(arguments)}) id {call_id}"
            for name, arguments, call_id in _calls(message)]


def _page(what: str, lines: list[str], result: dict[str, Any], offset: int,
          order: str = "") -> str:
    """A page of a list: what it holds and where it stands, then one entry a line."""
    if not lines:
        return f"No {what} at offset {offset} (total {result['total']})."
    # Only the first letter: `what` may end in a session id, and ids are case-sensitive.
    head = (f"{what[:1].upper()}{what[1:]} {offset + 1}-{offset + len(lines)} "
            f"of {result['total']}{order}")
    if result["has_more"]:
        head += f" (more: offset {offset + len(lines)})"
    return "\n".join([head + ":", *lines])


def sessions(result: dict[str, Any], offset: int) -> str:
    lines = [f"- {session_line(s)}" for s in result["sessions"]]
    return _page("sessions", lines, result, offset, ", most recent first")


def messages(session_id: str, result: dict[str, Any], offset: int) -> str:
    return _page(f"messages of {session_id}", [message_line(m) for m in result["messages"]],
                 result, offset)


def resumed(result: dict[str, Any]) -> str:
    found = result["messages"]
    lines = [f"Session {session_line(result['session'])}"]
    held = result.get("summary")
    if held is not None:
        lines.append(f"Summary of the earlier conversation (up to message {held['up_to_seq']}), "
                     f"sent first: {_cut(held['text'])}")
    lines.append(f"History a turn would be sent now: {len(found)} messages, oldest first"
                 + (":" if found else "."))
    return "\n".join(lines + [message_line(m) for m in found])


def sent(result: dict[str, Any]) -> str:
    reply = result["reply"]
    lines = [f"assistant: {_cut(content_text(reply.get('content')))}"]
    if isinstance(reply.get("refusal"), str):
        lines.append(f"refusal: {_cut(reply['refusal'])}")
    lines += _call_lines(reply)
    return "\n".join([*lines, f"Stored in session {session_line(result['session'])}"])


def one_session(verb: str, result: dict[str, Any]) -> str:
    return f"{verb} session {session_line(result['session'])}"


def exported(doc: dict[str, Any]) -> str:
    count = len(doc["messages"])
    return (f"Export of {doc['session']['id']} ({count} messages, format {doc['format']}). "
            "To copy it, pass this document unchanged as `document` to import_session:\n"
            + json.dumps(doc, ensure_ascii=False))


def cleaned(result: dict[str, Any], older_than: str | None) -> str:
    period = f"older than {older_than}" if older_than else "past the configured retention"
    return (f"Deleted {result['deleted_sessions']} of your sessions ({period}) with "
            f"{result['deleted_messages']} messages.")


# --- the transcript ---------------------------------------------------------------------------


def _fenced(text: str, info: str = "") -> str:
    """`text` in a code fence longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def transcript(doc: dict[str, Any]) -> str:
    """An export document (contract §5) as Markdown."""
    session = doc["session"]
    lines = [f"# {session['session_name'] or 'Untitled session'}", "",
             f"- id: `{session['id']}`", f"- model: {session['model'] or '(any)'}",
             f"- messages: {session['message_count']}, tokens: {session['total_tokens']}",
             f"- created: {session['created_at']}, last message: "
             f"{session['last_message_at'] or 'none'}"]
    if session["system_prompt"]:
        lines += ["", "## System prompt", "", session["system_prompt"]]
    for message in doc["messages"]:
        heading = f"{message['seq']} · {message['role']}"
        if message["role"] == "tool" and message.get("tool_call_id"):
            heading += f" · result of `{message['tool_call_id']}`"
        if message["status"] == "incomplete":
            heading += " · incomplete (the reply was cut off)"
        lines += ["", f"## {heading}", ""]
        text = content_text(message.get("content"))
        if text:
            lines.append(text)
        for name, arguments, call_id in _calls(message):
            lines += ["", f"**Tool call** `{name}` · id `{call_id}`", _fenced(arguments, "json")]
    return "\n".join(lines) + "\n"
