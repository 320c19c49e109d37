"""A Responses request translated into chat completions (proxy/responses/request.py), and the
event stream made from chat chunks (proxy/responses/events.py), both pure."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses import Response as SdkResponse
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from proxy.errors import BadRequest
from proxy.responses import request
from proxy.responses.answer import Reply, response_object
from proxy.responses.events import EventStream
from proxy.responses.shapes import ResponseCreate

EVENT = TypeAdapter(ResponseStreamEvent)


def test_the_documented_request_is_the_one_that_is_read() -> None:
    assert set(ResponseCreate.model_fields) == request.FIELDS


def test_every_mapped_field_reaches_the_chat_body() -> None:
    plan = request.plan({
        "model": "m", "input": "hi", "instructions": "sys", "stream": True,
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"},
                   "strict": True, "description": "d"}],
        "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": False,
        "max_output_tokens": 99, "temperature": 0.5, "top_p": 0.9,
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"},
                            "strict": True}, "verbosity": "low"},
        "reasoning": {"effort": "high", "summary": "auto"}, "metadata": {"a": "b"},
        "user": "u", "safety_identifier": "si", "prompt_cache_key": "pk",
        "service_tier": "flex", "top_logprobs": 3, "truncation": "disabled", "store": False,
        "max_history_messages": 4, "include": ["message.output_text.logprobs"],
        "stream_options": {"include_obfuscation": False}, "prompt_cache_retention": "24h",
        "background": False, "max_tool_calls": 3, "prompt": None,
    })
    assert plan.body == {
        "model": "m", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {
            "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": False, "max_completion_tokens": 99, "temperature": 0.5,
        "top_p": 0.9, "verbosity": "low",
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "s", "schema": {"type": "object"}, "strict": True}},
        "reasoning_effort": "high", "user": "u", "safety_identifier": "si",
        "prompt_cache_key": "pk", "service_tier": "flex", "logprobs": True, "top_logprobs": 3,
    }
    assert (plan.store, plan.stream, plan.history_limit) == (False, True, 4)
    assert (plan.settings["truncation"], plan.settings["metadata"]) == ("disabled", {"a": "b"})


def test_the_other_formats_and_tool_choices() -> None:
    body = request.plan({"model": "m", "text": {"format": {"type": "json_object"}}, "input": "x",
                         "tools": [{"type": "function", "name": "f"}],
                         "tool_choice": {"type": "allowed_tools", "mode": "required",
                                         "tools": [{"type": "function", "name": "f"}]}}).body
    assert body["response_format"] == {"type": "json_object"}
    echoed = request.plan({"model": "m", "input": "x",
                           "tools": [{"type": "function", "name": "f"}]}).settings["tools"]
    assert echoed == [{"type": "function", "name": "f", "description": None, "parameters": None,
                       "strict": None}]  # every field OpenAI's response object has
    assert body["tool_choice"] == {"type": "allowed_tools", "allowed_tools": {
        "mode": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}}
    plain = request.plan({"model": "m", "text": {"format": {"type": "text"}}, "input": "x",
                          "parallel_tool_calls": True}).body
    # no tools: parallel_tool_calls is left out
    assert plain == {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": "x"}, "model", "missing_required_parameter"),
    ({"model": "m"}, "input", "missing_required_parameter"),
    ({"model": "m", "input": [{"type": "reasoning", "summary": []}]}, "input",
     "missing_required_parameter"),
    ({"model": 5}, "model", "invalid_value"),
    ({"model": "m", "colour": "red"}, "colour", "unknown_parameter"),
    ({"model": "m", "background": True}, "background", "unsupported_value"),
    ({"model": "m", "prompt": {"id": "pmpt_1"}}, "prompt", "unsupported_value"),
    ({"model": "m", "tools": [{"type": "web_search"}]}, "tools[0].type", "unsupported_value"),
    ({"model": "m", "tools": [{"type": "file_search", "vector_store_ids": []}]},
     "tools[0].type", "unsupported_value"),
    ({"model": "m", "tools": [{"type": "teleport"}]}, "tools[0].type", "invalid_value"),
    ({"model": "m", "tools": [{"type": "function"}]}, "tools[0].name", "invalid_value"),
    ({"model": "m", "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type",
     "unsupported_value"),
    ({"model": "m", "conversation": "sess_a", "previous_response_id": "resp_b"},
     "previous_response_id", "invalid_value"),
    ({"model": "m", "conversation": 5}, "conversation", "invalid_value"),
    ({"model": "m", "stream": "yes"}, "stream", "invalid_value"),
    ({"model": "m", "temperature": "hot"}, "temperature", "invalid_value"),
    ({"model": "m", "max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"model": "m", "metadata": {str(i): "v" for i in range(17)}}, "metadata", "invalid_value"),
    ({"model": "m", "metadata": {"k": "v" * 513}}, "metadata", "invalid_value"),
    ({"model": "m", "text": {"format": {"type": "yaml"}}}, "text.format.type", "invalid_value"),
    ({"model": "m", "truncation": "sometimes"}, "truncation", "invalid_value"),
    ({"model": "m", "max_history_messages": 1001}, "max_history_messages", "invalid_value"),
    ({"model": "m", "input": [{"type": "computer_call_output"}]}, "input[0].type",
     "unsupported_value"),
])
def test_bad_input_is_a_400_naming_the_field(body: dict[str, Any], param: str, code: str) -> None:
    with pytest.raises(BadRequest) as refused:
        request.plan(body)
    assert (refused.value.param, refused.value.code) == (param, code)


# --- the event stream ---------------------------------------------------------------------------


def chunk(**delta: Any) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


def parsed(stream: bytes) -> list[dict[str, Any]]:
    events = []
    for block in stream.decode().split("\n\n"):
        if block:
            kind, data = block.split("\n")
            event = json.loads(data.removeprefix("data: "))
            assert kind == "event: " + event["type"]
            EVENT.validate_python(event)  # each one parses as the SDK's own event model
            events.append(event)
    return events


SETTINGS = request.plan({"model": "m", "input": "x"}).settings


def test_each_chunk_makes_its_events_at_once_and_finish_closes_every_item() -> None:
    stream = EventStream(response_object("resp_x", 1, SETTINGS), "x")
    sent = [stream.start()]
    sent.append(stream.feed(chunk(role="assistant", content="")))
    assert sent[-1] == b""  # nothing to say yet
    sent.append(stream.feed(chunk(content="Let me ")))
    assert [e["type"] for e in parsed(sent[-1])] == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta"]
    sent.append(stream.feed(chunk(content="check.")))
    sent.append(stream.feed(chunk(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                               "function": {"name": "f", "arguments": "{\"a\""}}])))
    sent.append(stream.feed(chunk(tool_calls=[{"index": 0, "function": {"arguments": ":1}"}}])))
    reply = {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}
    final = response_object("resp_x", 1, SETTINGS, reply=Reply(
        reply, "complete", "tool_calls", None, 10, 7))
    sent.append(stream.finish(final))
    events = parsed(b"".join(sent))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    completed = SdkResponse.model_validate(events[-1]["response"])
    assert completed.output_text == "Let me check."
    assert completed.usage is not None and (completed.usage.input_tokens,
                                            completed.usage.output_tokens) == (10, 4)
    assert [e["item"]["id"] for e in events if e["type"] == "response.output_item.done"] == [
        "msg_x", "fc_x_0"]


@pytest.mark.parametrize(("finish", "status", "terminal", "details"), [
    ("length", "complete", "response.incomplete", {"reason": "max_output_tokens"}),
    ("content_filter", "complete", "response.incomplete", {"reason": "content_filter"}),
    (None, "incomplete", "response.incomplete", {"reason": None}),
    ("stop", "complete", "response.completed", None),
])
def test_the_status_follows_the_finish_reason(
    finish: str | None, status: str, terminal: str, details: Any
) -> None:
    final = response_object("resp_y", 1, SETTINGS, reply=Reply(
        {"role": "assistant", "content": "partial"}, status, finish, None, 1, 4))
    assert final["incomplete_details"] == details
    stream = EventStream(response_object("resp_y", 1, SETTINGS), "y")
    events = parsed(stream.start() + stream.finish(final))  # a replay: nothing fed
    assert events[-1]["type"] == terminal
    assert [e["type"] for e in events[2:-1]] == [
        "response.output_item.added", "response.content_part.added",
        "response.output_text.done", "response.content_part.done", "response.output_item.done"]
