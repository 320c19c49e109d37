"""A fake OpenAI upstream that checks what OpenAI checks of a conversation, for the client suite.

Every chat completion request is checked the way OpenAI's API checks `messages`; a request that
breaks a rule is answered 400 (as OpenAI would) and the rule is recorded (`violations_since`):

- every `tool` message answers a call of the `tool_calls` message whose answers it follows;
- every `tool_calls` message is answered, call by call, before the next message of another role;
- no message appears twice (the test conversations never repeat one on purpose).

It answers like a model with a `get_weather`-style tool: a request with `tools` whose last
message is the user's gets one tool call (its arguments name the last word of the question), a
request whose last message is a tool result gets the text `The weather: <result>.`, anything else
gets `echo: <last message's text>`; with `response_format` of type `json_schema` the text is the
JSON object `{"answer": <that text>}`. With `stream: true` it streams the same reply (arguments
in two pieces, a usage chunk when `stream_options.include_usage` is set).
"""

from __future__ import annotations

import itertools
import json
import threading
from typing import Any

from tests.threaded import Threaded, read_body


class StrictUpstream:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.violations: list[tuple[int, str]] = []  # (the request's index, the rule broken)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._threaded = Threaded(self.app, log_level="critical", loop="asyncio")
        self.base_url = f"http://127.0.0.1:{self._threaded.port}/v1"

    def __enter__(self) -> StrictUpstream:
        self._threaded.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._threaded.stop()

    def bodies_since(self, start: int) -> list[dict[str, Any]]:
        with self._lock:
            return self.requests[start:]

    def violations_since(self, start: int) -> list[str]:
        with self._lock:
            return [problem for index, problem in self.violations if index >= start]

    # --- the ASGI app -------------------------------------------------------------------------

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        raw = await read_body(receive)
        if scope["path"] != "/v1/chat/completions":
            await _send(send, 404, {"error": {"message": "no such route"}})
            return
        body = json.loads(raw)
        problem = conversation_problem(body.get("messages", []))
        with self._lock:
            self.requests.append(body)
            if problem is not None:
                self.violations.append((len(self.requests) - 1, problem))
            call_id = f"call_{next(self._ids)}"
        if problem is not None:
            await _send(send, 400, {"error": {"message": problem, "type": "invalid_request_error",
                                              "param": "messages", "code": None}})
            return
        reply = answer(body, call_id)
        if body.get("stream"):
            await _stream(send, reply, bool((body.get("stream_options") or {})
                                            .get("include_usage")))
            return
        finish = "tool_calls" if reply.get("tool_calls") else "stop"
        await _send(send, 200, {
            "id": "chatcmpl-strict", "object": "chat.completion", "created": 1,
            "model": body.get("model"), "choices": [{"index": 0, "finish_reason": finish,
                                                     "message": {**reply, "refusal": None}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})


def text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def identity(message: dict[str, Any]) -> str:
    """What makes a message itself, as a string (content, result or calls by id)."""
    calls = [c.get("id") for c in message.get("tool_calls") or []]
    return json.dumps([message.get("role"), text_of(message), message.get("tool_call_id"), calls])


def conversation_problem(messages: list[dict[str, Any]]) -> str | None:
    """The first rule `messages` breaks, or None."""
    pending: set[str] = set()
    seen: set[str] = set()
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "tool":
            if message.get("tool_call_id") not in pending:
                return (f"messages[{index}]: a message with role 'tool' must be a response to "
                        "a preceding message with 'tool_calls'")
            pending.discard(message["tool_call_id"])
        elif pending:
            return (f"messages[{index}]: an assistant message with 'tool_calls' must be followed "
                    f"by tool messages responding to each 'tool_call_id' ({sorted(pending)})")
        else:
            pending = {c["id"] for c in message.get("tool_calls") or []}
        if role not in ("system", "developer"):
            if identity(message) in seen:
                return f"messages[{index}]: sent twice: {identity(message)}"
            seen.add(identity(message))
    if pending:
        return f"the conversation ends with unanswered tool calls ({sorted(pending)})"
    return None


def answer(body: dict[str, Any], call_id: str) -> dict[str, Any]:
    last = body["messages"][-1]
    tools = body.get("tools") or []
    if last.get("role") == "user" and tools:
        city = text_of(last).rstrip("?!. ").split(" ")[-1]
        name = tools[0]["function"]["name"]
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": name,  # compact, as OpenAI writes them
                          "arguments": json.dumps({"city": city}, separators=(",", ":"))}}]}
    text = (f"The weather: {text_of(last)}." if last.get("role") == "tool"
            else f"echo: {text_of(last)}")
    if (body.get("response_format") or {}).get("type") == "json_schema":
        text = json.dumps({"answer": text})
    return {"role": "assistant", "content": text}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-strict", "object": "chat.completion.chunk", "created": 1,
            "model": "strict", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


async def _stream(send: Any, reply: dict[str, Any], usage: bool) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    chunks = [_chunk({"role": "assistant", "content": None if reply.get("tool_calls") else ""})]
    for index, call in enumerate(reply.get("tool_calls") or []):
        arguments = call["function"]["arguments"]
        half = len(arguments) // 2
        chunks.append(_chunk({"tool_calls": [{"index": index, "id": call["id"],
                                              "type": "function", "function": {
                                                  "name": call["function"]["name"],
                                                  "arguments": arguments[:half]}}]}))
        chunks.append(_chunk({"tool_calls": [{"index": index,
                                              "function": {"arguments": arguments[half:]}}]}))
    if reply.get("content"):
        words = reply["content"].split(" ")
        chunks += [_chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
    chunks.append(_chunk({}, "tool_calls" if reply.get("tool_calls") else "stop"))
    if usage:
        chunks.append({**_chunk({}), "choices": [],
                       "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
    for value in chunks:
        await send({"type": "http.response.body", "more_body": True,
                    "body": b"data: " + json.dumps(value).encode() + b"\n\n"})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def _send(send: Any, status: int, value: Any) -> None:
    body = json.dumps(value).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
