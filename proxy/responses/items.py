"""Responses items <-> chat messages: the one mapping, both ways (contract §10). Pure.

Items to messages (a request's `input`, a conversation's new items):

- `message` (`user`, `system`, `developer`, `assistant`): a message of that role; its `content`
  a string as it is, or parts: `input_text` / `output_text` → `text`, `input_image` →
  `image_url`, `input_file` → `file`, `input_audio` as it is; a list of one text part becomes a
  string; an assistant's `refusal` parts become its `refusal`;
- `function_call` items in a row: one assistant message's `tool_calls` (the assistant `message`
  item just before them, if any, is that message's content);
- `function_call_output`: a `tool` message (`call_id` → `tool_call_id`, `output` its content);
- `reasoning`: nothing (an upstream asked through chat completions has no use for it).

Messages to items is the inverse: a stored assistant message with tool calls is its `message`
item (when it has content or a refusal) followed by one `function_call` item per call; a `tool`
message is a `function_call_output` item. Item ids come from where the message is stored
(`ItemIds`), so they are the same on every read. A stored part of a kind chat completions has
and Responses has not is shown as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.errors import BadRequest

MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
# Items that name work done by a hosted tool or stored state: nothing here can honour them.
UNSUPPORTED_ITEMS = frozenset({
    "item_reference", "file_search_call", "web_search_call", "computer_call",
    "computer_call_output", "image_generation_call", "code_interpreter_call", "local_shell_call",
    "local_shell_call_output", "shell_call", "shell_call_output", "apply_patch_call",
    "apply_patch_call_output", "mcp_list_tools", "mcp_approval_request", "mcp_approval_response",
    "mcp_call", "custom_tool_call", "custom_tool_call_output", "tool_search_call",
    "tool_search_output", "compaction", "compaction_trigger", "additional_tools",
    "program", "program_output", "configuration_update",
})
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def unsupported(message: str, param: str) -> BadRequest:
    return BadRequest(message, param=param, code="unsupported_value")


# --- items -> messages --------------------------------------------------------------------------


def to_messages(items: Any, param: str = "input") -> list[dict[str, Any]]:
    """The chat messages `items` stand for (a string is one user message); 400 naming the
    first item, field or part that is wrong."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise BadRequest(f"{param} must be a string or an array of items", param=param)
    messages: list[dict[str, Any]] = []
    takes_calls = False  # the last message is an assistant's that the next calls belong to
    for index, item in enumerate(items):
        where = f"{param}[{index}]"
        if not isinstance(item, dict):
            raise BadRequest("Each item must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            message = _message(item, where)
            messages.append(message)
            takes_calls = message["role"] == "assistant"
        elif kind == "function_call":
            call = _call(item, where)
            last = messages[-1] if takes_calls else None
            if last is not None:
                last.setdefault("tool_calls", []).append(call)
                if last["content"] == "":
                    last["content"] = None  # an assistant turn of calls only
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            takes_calls = True
        elif kind == "function_call_output":
            messages.append(_output(item, where))
            takes_calls = False
        elif kind == "reasoning":
            continue
        elif isinstance(kind, str) and kind in UNSUPPORTED_ITEMS:
            raise unsupported(f"Items of type {kind} are not supported", f"{where}.type")
        else:
            raise BadRequest("Unknown item type", param=f"{where}.type")
    return messages


def _text(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        code = "missing_required_parameter" if value is None else "invalid_value"
        raise BadRequest(f"{where}.{name} must be a string", param=f"{where}.{name}", code=code)
    return value


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if not isinstance(role, str) or role not in MESSAGE_ROLES:
        raise BadRequest(f"{where}.role must be one of {', '.join(sorted(MESSAGE_ROLES))}",
                         param=f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content must be a string or an array of parts",
                         param=f"{where}.content")
    parts: list[dict[str, Any]] = []
    refusals: list[str] = []
    for index, part in enumerate(content):
        at = f"{where}.content[{index}]"
        if isinstance(part, dict) and part.get("type") == "refusal" and role == "assistant":
            refusals.append(_text(part, "refusal", at))
        else:
            parts.append(_part(part, at))
    message: dict[str, Any] = {"role": role, "content": _content(parts)}
    if refusals:
        message["refusal"] = "".join(refusals)
        if not parts:
            message["content"] = None
    elif role == "assistant" and not parts:
        message["content"] = ""
    return message


def _content(parts: list[dict[str, Any]]) -> Any:
    """Chat content from chat parts: one text part is a string; no part at all, an empty one."""
    if len(parts) == 1 and parts[0].get("type") == "text":
        return parts[0]["text"]
    return parts if parts else ""


def _part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise BadRequest("Each content part must be an object", param=where)
    kind = part.get("type")
    if kind in TEXT_PARTS:
        return {"type": "text", "text": _text(part, "text", where)}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            if part.get("file_id") is not None:
                raise unsupported("Images by file_id are not supported; send image_url",
                                  f"{where}.file_id")
            raise BadRequest(f"{where}.image_url must be a string", param=f"{where}.image_url")
        image: dict[str, Any] = {"url": url}
        if part.get("detail") is not None:
            image["detail"] = _text(part, "detail", where)
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        if part.get("file_url") is not None:
            raise unsupported("Files by file_url are not supported", f"{where}.file_url")
        file = {name: _text(part, name, where) for name in ("file_id", "file_data", "filename")
                if part.get(name) is not None}
        if "file_id" not in file and "file_data" not in file:
            raise BadRequest(f"{where} needs file_id or file_data", param=where,
                             code="missing_required_parameter")
        return {"type": "file", "file": file}
    if kind == "input_audio":
        if not isinstance(part.get("input_audio"), dict):
            raise BadRequest(f"{where}.input_audio must be an object",
                             param=f"{where}.input_audio")
        return {"type": "input_audio", "input_audio": part["input_audio"]}
    raise BadRequest("Unknown content part type", param=f"{where}.type")


def _call(item: dict[str, Any], where: str) -> dict[str, Any]:
    return {
        "id": _text(item, "call_id", where),
        "type": "function",
        "function": {"name": _text(item, "name", where),
                     "arguments": _text(item, "arguments", where)},
    }


def _output(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = _text(item, "call_id", where)
    output = item.get("output")
    if isinstance(output, str):
        content: Any = output
    elif isinstance(output, list):
        content = _content([_part(p, f"{where}.output[{i}]") for i, p in enumerate(output)])
    else:
        raise BadRequest(f"{where}.output must be a string or an array of parts",
                         param=f"{where}.output",
                         code="missing_required_parameter" if output is None else "invalid_value")
    return {"role": "tool", "tool_call_id": call_id, "content": content}


# --- messages -> items --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ItemIds:
    """The ids of one stored message's items: `msg_<stem>` for the item that is the message
    itself (a `message` or a `function_call_output`), `fc_<stem>_<i>` for its i-th call."""

    stem: str

    @property
    def message(self) -> str:
        return f"msg_{self.stem}"

    def call(self, index: int) -> str:
        return f"fc_{self.stem}_{index}"


def parse_item_id(item_id: str) -> tuple[int, int | None] | None:
    """(row id, call index or None) of a conversation item id (`msg_<row>`, `fc_<row>_<i>`)."""
    kind, _, rest = item_id.partition("_")
    if kind == "msg" and rest.isascii() and rest.isdigit() and len(rest) <= 18:
        return int(rest), None
    row, _, index = rest.partition("_")
    if (kind == "fc" and row.isascii() and row.isdigit() and len(row) <= 18
            and index.isascii() and index.isdigit() and len(index) <= 9):
        return int(row), int(index)
    return None


def has_message_item(message: dict[str, Any]) -> bool:
    """Whether a stored message shows as a `message` item (an assistant's with tool calls only
    when it has content or a refusal)."""
    if message.get("role") != "assistant" or not calls_of(message):
        return True
    return bool(message.get("content")) or bool(message.get("refusal"))


def to_items(
    message: dict[str, Any], ids: ItemIds, status: str = "complete"
) -> list[dict[str, Any]]:
    """The items one stored chat message shows as."""
    state = "completed" if status == "complete" else "incomplete"
    role = message.get("role")
    if role == "tool":
        return [{"id": ids.message, "type": "function_call_output", "status": state,
                 "call_id": message.get("tool_call_id"),
                 "output": _output_value(message.get("content"))}]
    items: list[dict[str, Any]] = []
    if has_message_item(message):
        shown = "tool" if role == "function" else role
        items.append({"id": ids.message, "type": "message", "status": state, "role": shown,
                      "content": _parts(message, assistant=role == "assistant")})
    for index, call in enumerate(calls_of(message)):
        function = call["function"] if isinstance(call.get("function"), dict) else {}
        items.append({"id": ids.call(index), "type": "function_call", "status": state,
                      "call_id": call.get("id"), "name": function.get("name"),
                      "arguments": function.get("arguments")})
    return items


def calls_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A stored message's tool calls (those that are objects)."""
    calls = message.get("tool_calls")
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def _parts(message: dict[str, Any], *, assistant: bool) -> list[Any]:
    content = message.get("content")
    text = _text_part(assistant)
    if isinstance(content, str):
        parts: list[Any] = [text(content)]
    elif isinstance(content, list):
        parts = [_item_part(p, text) for p in content]
    else:
        parts = []
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    return parts


def _text_part(assistant: bool) -> Callable[[Any], dict[str, Any]]:
    if assistant:
        return lambda text: {"type": "output_text", "text": text, "annotations": []}
    return lambda text: {"type": "input_text", "text": text}


def _item_part(part: Any, text: Callable[[Any], dict[str, Any]]) -> Any:
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind == "text":
        return text(part.get("text"))
    if kind == "image_url" and isinstance(part.get("image_url"), dict):
        image = part["image_url"]
        return {"type": "input_image", "image_url": image.get("url"),
                "detail": image.get("detail", "auto")}
    if kind == "file" and isinstance(part.get("file"), dict):
        return {"type": "input_file", **part["file"]}
    return part  # input_audio, refusal, or what Responses has no part for: as it is


def _output_value(content: Any) -> Any:
    if isinstance(content, list):
        return [_item_part(p, _text_part(False)) for p in content]
    return content if content is not None else ""
