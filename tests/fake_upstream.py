"""A small OpenAI-compatible upstream for end-to-end tests, served by uvicorn in a thread.

It records every request it receives (path, headers, JSON body) and answers by `model`:

| model        | answer |
|--------------|--------|
| `fake-echo`  | `"echo: <content of the last message>"`, after a short random pause (so that |
|              | concurrent turns finish out of order) |
| `fake-tools` | a `get_weather` call for a user message; after a tool message, |
|              | `"The weather is <its content>."` |
| `fake-break` | streams `"Hello, wor"` and then drops the connection mid-body |
| `fake-slow`  | streams `"tick "` every 0.1 s for a minute, and notes when its client went away |
| `fake-gated` | streams `"first"`, then waits for `gate` before `" second"` |

Any model answers as a stream when the request says `"stream": true` (with a usage chunk when
`stream_options.include_usage` is set), and as one chat completion otherwise. With `"logprobs":
true`, each word of a text reply comes with its log probability (-0.5; `top_logprobs` of them,
the word itself first), in the choice's `logprobs.content` or in its chunk's.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from tests.threaded import Threaded, read_body

SLOW_TICKS = 600
SLOW_INTERVAL = 0.1


@dataclass
class Received:
    number: int
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeUpstream:
    requests: list[Received] = field(default_factory=list)
    disconnected: set[int] = field(default_factory=set)  # request numbers whose client left
    gate: threading.Event = field(default_factory=threading.Event)
    url: str = ""
    _threaded: Threaded | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._threaded = Threaded(self.app, log_level="critical")
        self._threaded.start()
        self.url = f"http://127.0.0.1:{self._threaded.port}"

    def stop(self) -> None:
        self.gate.set()
        if self._threaded is not None:
            self._threaded.stop()

    def __enter__(self) -> FakeUpstream:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def bodies(self, model: str | None = None) -> list[Any]:
        return [r.body for r in self.requests if model is None or r.body.get("model") == model]

    # --- the ASGI app -------------------------------------------------------------------------

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        raw = await read_body(receive)
        number = len(self.requests)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        body: dict[str, Any] = json.loads(raw) if raw else {}
        self.requests.append(Received(number, scope["path"], headers, body))
        if scope["path"] == "/v1/models":
            await _json(send, 200, {"object": "list", "data": [{"id": "fake-echo"}]})
            return
        if scope["path"] != "/v1/chat/completions":
            await _json(send, 404, {"error": {"message": "no such route"}})
            return
        model = body.get("model", "fake-echo")
        if body.get("stream"):
            await self._stream(number, model, body, receive, send)
            return
        if model == "fake-echo":
            await asyncio.sleep(random.uniform(0, 0.05))
        reply = _reply(model, body)
        answer = _completion(model, reply)
        if body.get("logprobs") and reply.get("content"):
            answer["choices"][0]["logprobs"] = {"content": [
                _logprob(d["content"], body) for d in _deltas(reply)], "refusal": None}
        await _json(send, 200, answer)

    async def _stream(
        self, number: int, model: str, body: dict[str, Any], receive: Any, send: Any
    ) -> None:
        gone = asyncio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            self.disconnected.add(number)

        listener = asyncio.create_task(listen())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})

        async def event(value: Any) -> None:
            data = value if isinstance(value, str) else json.dumps(value)
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(),
                        "more_body": True})

        try:
            reply = _reply(model, body)
            # as OpenAI does: content is null in the first delta of a tool call reply
            first = None if reply.get("tool_calls") else ""
            await event(_chunk(model, {"role": "assistant", "content": first}))
            if model == "fake-break":
                await event(_chunk(model, {"content": "Hello, "}))
                await event(_chunk(model, {"content": "wor"}))
                await asyncio.sleep(0.05)
                raise ConnectionAbortedError("the fake upstream breaks the stream")
            if model == "fake-slow":
                for _ in range(SLOW_TICKS):
                    if gone.is_set():
                        return
                    await event(_chunk(model, {"content": "tick "}))
                    await asyncio.sleep(SLOW_INTERVAL)
            elif model == "fake-gated":
                await event(_chunk(model, {"content": "first"}))
                await asyncio.to_thread(self.gate.wait, 30)
                await event(_chunk(model, {"content": " second"}))
            else:
                for delta in _deltas(reply):
                    chunk = _chunk(model, delta)
                    if body.get("logprobs") and "content" in delta:
                        chunk["choices"][0]["logprobs"] = {
                            "content": [_logprob(delta["content"], body)], "refusal": None}
                    await event(chunk)
            await event(_chunk(model, {}, "tool_calls" if model == "fake-tools" else "stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = _chunk(model, {})
                usage["choices"] = []
                usage["usage"] = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                await event(usage)
            await event("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            listener.cancel()


def _reply(model: str, body: dict[str, Any]) -> dict[str, Any]:
    last = body["messages"][-1]
    if model == "fake-tools":
        if last["role"] == "tool":
            return {"role": "assistant", "content": f"The weather is {last['content']}."}
        call = {"id": f"call_{random.randrange(10**8)}", "type": "function",
                "function": {"name": "get_weather",
                             "arguments": json.dumps({"city": last["content"]})}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    return {"role": "assistant", "content": f"echo: {last['content']}"}


def _deltas(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The message cut into stream deltas: words of content, tool call arguments in pieces."""
    if message.get("tool_calls"):
        deltas = []
        for index, call in enumerate(message["tool_calls"]):
            arguments = call["function"]["arguments"]
            half = len(arguments) // 2
            deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                           "function": {"name": call["function"]["name"],
                                                        "arguments": arguments[:half]}}]})
            deltas.append({"tool_calls": [{"index": index,
                                           "function": {"arguments": arguments[half:]}}]})
        return deltas
    words = message["content"].split(" ")
    return [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)]


def _logprob(token: str, body: dict[str, Any]) -> dict[str, Any]:
    entry = {"token": token, "logprob": -0.5, "bytes": list(token.encode())}
    others = [entry, {"token": "?", "logprob": -3.0, "bytes": [63]}]
    return {**entry, "top_logprobs": others[: body.get("top_logprobs") or 0]}


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _completion(model: str, message: dict[str, Any]) -> dict[str, Any]:
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {**message, "refusal": None},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


async def _json(send: Any, status: int, value: Any) -> None:
    body = json.dumps(value).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
