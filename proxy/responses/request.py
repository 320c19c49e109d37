"""A `POST /v1/responses` body, checked and translated into one chat completions request. Pure.

Every field of OpenAI's request is known here and has one of three fates: mapped to its chat
completions equivalent (`FORWARDED`, and the ones `plan` rewrites: `instructions`, `input`,
`tools`, `tool_choice`, `max_output_tokens`, `text`, `reasoning`, `top_logprobs`); read by the
proxy itself (`conversation`, `previous_response_id`, `store`, `metadata`, `truncation`,
`max_history_messages`); or accepted and left out, because leaving it out changes nothing when
the answer comes from chat completions (`IGNORED`). What cannot be honoured (`background: true`,
a stored `prompt`, a hosted tool) is a 400 `unsupported_value` naming it; an unknown field is a
400 `unknown_parameter`, as OpenAI answers. `settings` are what the `response` object echoes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.chatbody import history_override
from proxy.errors import BadRequest
from proxy.responses.items import to_messages, unsupported

# Chat completions has the same field, with the same meaning.
FORWARDED = ("temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier",
             "prompt_cache_key", "service_tier")
# Accepted, and changing nothing here (hosted features, caching hints, stream details).
IGNORED = frozenset({"include", "stream_options", "prompt_cache_retention", "prompt_cache_options",
                     "context_management", "image", "access_programs", "background_options",
                     "max_tool_calls"})
READ = frozenset({"model", "input", "instructions", "conversation", "previous_response_id",
                  "store", "stream", "tools", "tool_choice", "max_output_tokens", "text",
                  "reasoning", "metadata", "truncation", "top_logprobs", "background", "prompt",
                  "moderation", "max_history_messages"})
FIELDS = READ | IGNORED | frozenset(FORWARDED)
HOSTED_TOOLS = frozenset({
    "file_search", "web_search", "web_search_preview", "web_search_2025_08_26",
    "web_search_preview_2025_03_11", "computer", "computer_use", "computer_use_preview", "mcp",
    "code_interpreter", "image_generation", "local_shell", "shell", "custom", "apply_patch",
    "tool_search", "namespace", "programmatic_tool_calling",
})
TOOL_CHOICE_MODES = frozenset({"none", "auto", "required"})
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


@dataclass
class Plan:
    """What a Responses request asks: the chat completions `body` to send (its `messages` the
    instructions and the input), where its history comes from, and what to keep and echo."""

    body: dict[str, Any]
    conversation: str | None
    previous_response_id: str | None
    store: bool
    stream: bool
    history_limit: int | None
    settings: dict[str, Any] = field(default_factory=dict)


def plan(request: Any) -> Plan:
    """`request` checked and translated; a 400 naming the first field that is wrong."""
    if not isinstance(request, dict):
        raise BadRequest("The request body must be a JSON object")
    for name in request:
        if name not in FIELDS:
            raise BadRequest(f"Unknown parameter: {name}", param=name, code="unknown_parameter")
    model = request.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model must be a non-empty string", param="model",
                         code="missing_required_parameter" if model is None else "invalid_value")
    _refuse_what_cannot_be_honoured(request)
    conversation, previous = _history(request)
    instructions = _optional(request, "instructions", str)
    messages = to_messages(request.get("input", []))
    if instructions is not None:
        messages.insert(0, {"role": "system", "content": instructions})
    body: dict[str, Any] = {"model": model, "messages": messages}
    stream = _optional(request, "stream", bool) is True
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # for the response's `usage`
    tools = _tools(request.get("tools"))
    if tools:
        body["tools"] = [_chat_tool(t) for t in tools]
    choice = request.get("tool_choice")
    if choice is not None:
        body["tool_choice"] = _tool_choice(choice)
    for name in FORWARDED:
        value = request.get(name)
        if value is not None and (name != "parallel_tool_calls" or tools):
            body[name] = _checked(name, value)
    if (limit := _optional(request, "max_output_tokens", int)) is not None:
        if limit < 1:
            raise BadRequest("max_output_tokens must be at least 1", param="max_output_tokens")
        body["max_completion_tokens"] = limit
    text = _text(request.get("text"), body)
    reasoning = _reasoning(request.get("reasoning"), body)
    if (top := _optional(request, "top_logprobs", int)) is not None:
        if not 0 <= top <= 20:
            raise BadRequest("top_logprobs must be between 0 and 20", param="top_logprobs")
        body["logprobs"], body["top_logprobs"] = True, top
    include = request.get("include")
    if isinstance(include, list) and "message.output_text.logprobs" in include:
        body["logprobs"] = True  # the chosen tokens' own, with or without `top_logprobs`
    store = _optional(request, "store", bool)
    truncation = request.get("truncation")
    if truncation not in (None, "auto", "disabled"):
        raise BadRequest("truncation must be auto or disabled", param="truncation")
    settings = {
        "model": model,
        "instructions": instructions,
        "tools": [_echoed_tool(t) for t in tools],
        "tool_choice": choice if choice is not None else "auto",
        "parallel_tool_calls": request.get("parallel_tool_calls") is not False,
        "temperature": request.get("temperature"),
        "top_p": request.get("top_p"),
        "max_output_tokens": request.get("max_output_tokens"),
        "text": text,
        "reasoning": reasoning,
        "metadata": _metadata(request.get("metadata")),
        "truncation": truncation or "auto",
        "store": store is not False,
        "background": False,
        "top_logprobs": top or 0,
        "service_tier": request.get("service_tier") or "auto",
        **{name: request.get(name) for name in ("user", "safety_identifier", "prompt_cache_key")},
    }
    history_limit = history_override(request)
    if len(messages) == (instructions is not None) and conversation is None and previous is None:
        # nothing to answer: no input, no history
        raise BadRequest("input is required", param="input", code="missing_required_parameter")
    return Plan(body, conversation, previous, store is not False, stream, history_limit, settings)


def _refuse_what_cannot_be_honoured(request: dict[str, Any]) -> None:
    if request.get("background") not in (None, False):
        if request["background"] is not True:
            raise BadRequest("background must be a boolean", param="background")
        raise unsupported("Background responses are not supported", "background")
    if request.get("prompt") is not None:
        raise unsupported("Stored prompt templates are not supported", "prompt")
    if request.get("moderation") is not None:
        raise unsupported("Moderated responses are not supported", "moderation")


def _history(request: dict[str, Any]) -> tuple[str | None, str | None]:
    conversation = request.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
        if not isinstance(conversation, str):
            raise BadRequest("conversation.id must be a string", param="conversation.id")
    elif conversation is not None and not isinstance(conversation, str):
        raise BadRequest("conversation must be a string or an object with an id",
                         param="conversation")
    previous = _optional(request, "previous_response_id", str)
    if conversation is not None and previous is not None:
        raise BadRequest("conversation and previous_response_id cannot be used together",
                         param="previous_response_id")
    return conversation, previous


def _optional(request: dict[str, Any], name: str, kind: type) -> Any:
    value = request.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"{name} must be {_KINDS[kind]}", param=name)
    return value


_KINDS = {str: "a string", bool: "a boolean", int: "an integer", dict: "an object",
          list: "an array"}


def _checked(name: str, value: Any) -> Any:
    if name in ("temperature", "top_p"):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise BadRequest(f"{name} must be a number", param=name)
    elif name == "parallel_tool_calls":
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be a boolean", param=name)
    elif not isinstance(value, str):
        raise BadRequest(f"{name} must be a string", param=name)
    return value


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise BadRequest("tools must be an array", param="tools")
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict):
            raise BadRequest("Each tool must be an object", param=where)
        kind = tool.get("type")
        if kind == "function":
            if not isinstance(tool.get("name"), str):
                raise BadRequest(f"{where}.name must be a string", param=f"{where}.name")
            if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
                raise BadRequest(f"{where}.parameters must be an object",
                                 param=f"{where}.parameters")
        elif isinstance(kind, str) and kind in HOSTED_TOOLS:
            raise unsupported(f"Tools of type {kind} are not supported: only function tools",
                              f"{where}.type")
        else:
            raise BadRequest("Unknown tool type", param=f"{where}.type")
    return tools


def _echoed_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool as the response echoes it: every field of OpenAI's, null when unset."""
    return {"type": "function", "name": tool["name"], "description": tool.get("description"),
            "parameters": tool.get("parameters"), "strict": tool.get("strict")}


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """Responses' flat function tool as chat completions' nested one."""
    function: dict[str, Any] = {"name": tool["name"]}
    for name in ("description", "parameters", "strict"):
        if tool.get(name) is not None:
            function[name] = tool[name]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        if choice not in TOOL_CHOICE_MODES:
            raise BadRequest("tool_choice must be none, auto or required", param="tool_choice")
        return choice
    if not isinstance(choice, dict):
        raise BadRequest("tool_choice must be a string or an object", param="tool_choice")
    kind = choice.get("type")
    if kind == "function":
        if not isinstance(choice.get("name"), str):
            raise BadRequest("tool_choice.name must be a string", param="tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind == "allowed_tools":
        mode, tools = choice.get("mode"), choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(tools, list):
            raise BadRequest("tool_choice needs a mode (auto or required) and tools",
                             param="tool_choice")
        allowed = []
        for index, tool in enumerate(tools):
            if not (isinstance(tool, dict) and tool.get("type") == "function"
                    and isinstance(tool.get("name"), str)):
                raise unsupported("Only function tools can be allowed",
                                  f"tool_choice.tools[{index}]")
            allowed.append({"type": "function", "function": {"name": tool["name"]}})
        return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": allowed}}
    raise unsupported("Only function tools can be chosen", "tool_choice.type")


def _text(text: Any, body: dict[str, Any]) -> dict[str, Any]:
    """`text.format` as `response_format` (and `verbosity`); the echoed `text`."""
    if text is None:
        return {"format": {"type": "text"}}
    if not isinstance(text, dict):
        raise BadRequest("text must be an object", param="text")
    fmt = text.get("format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise BadRequest("text.format must be an object", param="text.format")
    kind = fmt.get("type")
    if kind == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise BadRequest("text.format needs a name and a schema", param="text.format")
        schema = {k: fmt[k] for k in ("name", "schema", "description", "strict")
                  if fmt.get(k) is not None}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif kind != "text":
        raise BadRequest("text.format.type must be text, json_object or json_schema",
                         param="text.format.type")
    echoed: dict[str, Any] = {"format": fmt}
    verbosity = text.get("verbosity")
    if verbosity is not None:
        if verbosity not in ("low", "medium", "high"):
            raise BadRequest("text.verbosity must be low, medium or high",
                             param="text.verbosity")
        body["verbosity"] = echoed["verbosity"] = verbosity
    return echoed


def _reasoning(reasoning: Any, body: dict[str, Any]) -> dict[str, Any]:
    if reasoning is None:
        return {"effort": None, "summary": None}
    if not isinstance(reasoning, dict):
        raise BadRequest("reasoning must be an object", param="reasoning")
    effort = reasoning.get("effort")
    if effort is not None:
        if not isinstance(effort, str):
            raise BadRequest("reasoning.effort must be a string", param="reasoning.effort")
        body["reasoning_effort"] = effort
    return {"effort": effort, "summary": reasoning.get("summary")}


def _metadata(metadata: Any) -> dict[str, str]:
    return check_metadata(metadata, "metadata") or {}


def check_metadata(metadata: Any, param: str) -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 pairs of strings, keys up to 64 characters, values 512."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS:
        raise BadRequest(f"{param} must be an object of at most {MAX_METADATA_PAIRS} pairs",
                         param=param)
    for key, value in metadata.items():
        if (len(key) > MAX_METADATA_KEY or not isinstance(value, str)
                or len(value) > MAX_METADATA_VALUE):
            raise BadRequest(f"{param} keys are at most {MAX_METADATA_KEY} characters, values "
                             f"strings of at most {MAX_METADATA_VALUE}", param=param)
    return metadata

