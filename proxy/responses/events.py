"""A chat.completion.chunk stream, translated into OpenAI's Responses event stream. Pure.

`EventStream` is fed one parsed chunk at a time and answers, at once, the events that chunk
makes (so each delta goes out as its chunk arrives); `sequence_number` counts from 0 without a
gap. The order of a stream:

    response.created, response.in_progress                       start()
    per output item, as the reply's deltas open it:              feed(chunk)
        response.output_item.added
        message:  response.content_part.added, response.output_text.delta …
                  (a refusal: response.refusal.delta …)
        call:     response.function_call_arguments.delta …
    per output item, once the reply is whole:                    finish(response)
        message:  response.output_text.done (refusal.done), response.content_part.done
        call:     response.function_call_arguments.done
        response.output_item.done
    response.completed / response.incomplete / response.failed

`finish` takes the final `response` object (proxy/responses/answer.py) and closes every item
from it, so the items done and the response completed are exactly what is stored; an item the
deltas never opened (an empty reply's message) is opened there. A replay is `start` then
`finish` with nothing fed between.
"""

from __future__ import annotations

from typing import Any

from proxy import codec
from proxy.responses.answer import logprobs_of, with_logprobs
from proxy.responses.items import ItemIds

TERMINAL = {"completed": "response.completed", "incomplete": "response.incomplete",
            "failed": "response.failed"}


class EventStream:
    """The events of one response; `response` is the response as it starts (in_progress)."""

    def __init__(self, response: dict[str, Any], stem: str) -> None:
        self._response = response
        self._ids = ItemIds(stem)
        self._seq = 0
        self._opened: list[str] = []  # item ids, by output_index
        self._parts: dict[str, list[str]] = {}  # a message's part types, by content_index
        self._calls: dict[int, str] = {}  # a chat tool call index -> its item id
        self.chunks = 0  # valid chunks fed
        self._logprobs: list[Any] = []  # the reply's token log probabilities, as they came

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + codec.dumps(data) + b"\n\n"

    def start(self) -> bytes:
        return (self._event("response.created", response=self._response)
                + self._event("response.in_progress", response=self._response))

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The events one chunk makes (b"" for none)."""
        self.chunks += 1
        out = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            logprobs = logprobs_of(choice)
            self._logprobs += logprobs
            for kind, value in (("output_text", delta.get("content")),
                                ("refusal", delta.get("refusal"))):
                if isinstance(value, str) and value:
                    out.append(self._text_delta(kind, value, logprobs))
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict) and isinstance(call.get("index", 0), int):
                    out.append(self._call_delta(call))
        return b"".join(out)

    def _text_delta(self, kind: str, text: str, logprobs: list[Any]) -> bytes:
        item_id = self._ids.message
        out = b""
        if item_id not in self._parts:
            out += self._added({"id": item_id, "type": "message", "status": "in_progress",
                                "role": "assistant", "content": []})
            self._parts[item_id] = []
        parts = self._parts[item_id]
        if kind not in parts:
            out += self._event("response.content_part.added", item_id=item_id,
                               output_index=self._opened.index(item_id),
                               content_index=len(parts), part=_empty_part(kind))
            parts.append(kind)
        fields: dict[str, Any] = {"item_id": item_id,
                                  "output_index": self._opened.index(item_id),
                                  "content_index": parts.index(kind), "delta": text}
        if kind == "output_text":
            fields["logprobs"] = logprobs
            return out + self._event("response.output_text.delta", **fields)
        return out + self._event("response.refusal.delta", **fields)

    def _call_delta(self, call: dict[str, Any]) -> bytes:
        index = call.get("index", 0)
        function = call["function"] if isinstance(call.get("function"), dict) else {}
        out = b""
        item_id = self._calls.get(index)
        if item_id is None:
            item_id = self._calls[index] = self._ids.call(index)
            out += self._added({"id": item_id, "type": "function_call", "status": "in_progress",
                                "call_id": call.get("id") or "", "name": function.get("name") or "",
                                "arguments": ""})
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            out += self._event("response.function_call_arguments.delta", item_id=item_id,
                               output_index=self._opened.index(item_id), delta=arguments)
        return out

    def _added(self, item: dict[str, Any]) -> bytes:
        self._opened.append(item["id"])
        return self._event("response.output_item.added", output_index=len(self._opened) - 1,
                           item=item)

    def finish(self, response: dict[str, Any]) -> bytes:
        """Every output item done, from the final `response`, then its terminal event."""
        response = with_logprobs(response, self._logprobs)
        out = []
        for item in response.get("output") or ():
            item_id = item["id"]
            if item_id not in self._opened:
                out.append(self._open_whole(item))
            index = self._opened.index(item_id)
            if item["type"] == "message":
                for content_index, part in enumerate(item["content"]):
                    out.append(self._part_done(item_id, index, content_index, part))
            elif item["type"] == "function_call":
                out.append(self._event("response.function_call_arguments.done",
                                       item_id=item_id, output_index=index,
                                       arguments=item["arguments"]))
            out.append(self._event("response.output_item.done", output_index=index, item=item))
        out.append(self._event(TERMINAL[response["status"]], response=response))
        return b"".join(out)

    def _open_whole(self, item: dict[str, Any]) -> bytes:
        """An item no delta opened: added, with its parts."""
        shell = {**item, "status": "in_progress"}
        if item["type"] == "message":
            shell["content"] = []
        elif item["type"] == "function_call":
            shell["arguments"] = ""
        out = self._added(shell)
        if item["type"] == "message":
            parts = self._parts.setdefault(item["id"], [])
            for part in item["content"]:
                kind = part.get("type") if isinstance(part, dict) else None
                out += self._event("response.content_part.added", item_id=item["id"],
                                   output_index=len(self._opened) - 1,
                                   content_index=len(parts), part=_empty_part(kind))
                parts.append(str(kind))
        return out

    def _part_done(self, item_id: str, index: int, content_index: int, part: Any) -> bytes:
        kind = part.get("type") if isinstance(part, dict) else None
        where = {"item_id": item_id, "output_index": index, "content_index": content_index}
        out = b""
        if kind == "output_text":
            out = self._event("response.output_text.done", **where, text=part["text"],
                              logprobs=part.get("logprobs", []))
        elif kind == "refusal":
            out = self._event("response.refusal.done", **where, refusal=part["refusal"])
        return out + self._event("response.content_part.done", **where, part=part)


def _empty_part(kind: Any) -> dict[str, Any]:
    if kind == "refusal":
        return {"type": "refusal", "refusal": ""}
    return {"type": "output_text", "text": "", "annotations": []}
