"""Items <-> chat messages (proxy/responses/items.py): the mapping both ways, its round trips
(hypothesis), and tool exchanges kept whole."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.conversations import ConversationItem
from pydantic import TypeAdapter

from proxy import history
from proxy.errors import BadRequest
from proxy.responses.items import ItemIds, parse_item_id, to_items, to_messages
from proxy.store.messages import stored

ITEM = TypeAdapter(ConversationItem)
TEXT = st.text(max_size=20)
IDS = st.text("abcdefghij0123456789_", min_size=1, max_size=12).map(lambda s: "call_" + s)


def items_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [item for n, m in enumerate(messages) for item in to_items(m, ItemIds(str(n)))]


# --- canonical chat messages (the form a message has once it went through items) -----------------

text_part = TEXT.map(lambda t: {"type": "text", "text": t})
image_part = st.builds(lambda u, d: {"type": "image_url", "image_url": {"url": u, "detail": d}},
                       TEXT, st.sampled_from(["auto", "low", "high"]))
file_part = st.builds(lambda f, n: {"type": "file", "file": {"file_id": f, "filename": n}},
                      TEXT, TEXT)
parts = st.lists(text_part | image_part | file_part, min_size=1, max_size=3).filter(
    lambda ps: not (len(ps) == 1 and ps[0]["type"] == "text"))  # one text part is a string
content = TEXT | parts
calls = st.lists(
    st.builds(lambda i, n, a: {"id": i, "type": "function",
                               "function": {"name": n, "arguments": a}}, IDS, TEXT, TEXT),
    min_size=1, max_size=3, unique_by=lambda call: call["id"])

plain = st.builds(lambda r, c: {"role": r, "content": c},
                  st.sampled_from(["user", "system", "developer"]), content)
said = st.builds(lambda c: {"role": "assistant", "content": c}, TEXT)
refused = st.builds(lambda c, r: {"role": "assistant", "content": c, "refusal": r},
                    st.none() | TEXT.filter(bool), TEXT.filter(bool))


@st.composite
def exchange(draw: st.DrawFn) -> list[dict[str, Any]]:
    """An assistant turn of tool calls (with or without text) and the answers to them."""
    made = draw(calls)
    text = draw(st.none() | TEXT.filter(bool))
    answers = [{"role": "tool", "tool_call_id": c["id"], "content": draw(TEXT)} for c in made]
    return [{"role": "assistant", "content": text, "tool_calls": made}, *answers]


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A history: messages and whole tool exchanges, where a turn of calls never directly
    follows another assistant message (the item list could not tell them apart)."""
    messages: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(0, 6))):
        unit = draw(st.sampled_from(["plain", "said", "refused", "exchange"]))
        if unit == "exchange":
            if messages and messages[-1]["role"] == "assistant":
                messages.append({"role": "user", "content": draw(TEXT)})
            messages.extend(draw(exchange()))
        else:
            messages.append(draw({"plain": plain, "said": said, "refused": refused}[unit]))
    return messages


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations())
def test_messages_to_items_and_back_are_the_same_messages(messages: list[dict[str, Any]]) -> None:
    items = items_of(messages)
    assert to_messages(items) == messages
    for item in items:
        ITEM.validate_python(item)  # OpenAI's own shape for a conversation item


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations())
def test_items_to_messages_and_back_are_the_same_items(messages: list[dict[str, Any]]) -> None:
    items = items_of(messages)
    again = items_of(to_messages(items))
    assert [{k: v for k, v in i.items() if k != "id"} for i in again] == [
        {k: v for k, v in i.items() if k != "id"} for i in items]


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations())
def test_tool_exchanges_stay_whole_through_the_mapping_and_the_history_rules(
    messages: list[dict[str, Any]]
) -> None:
    from proxy import codec

    back = to_messages(items_of(messages))
    window = [stored(n, m["role"], bool(m.get("tool_calls")), 1, codec.dumps_text(m))
              for n, m in enumerate(back)]
    kept = history.trim(window, budget=10_000).messages
    assert len(kept) == len(back)  # nothing broken: every exchange whole, none left out
    answered = {m.answers for m in kept if m.answers is not None}
    assert answered == {c for m in kept for c in m.calls}


def test_the_mapping_of_each_kind() -> None:
    items = [
        {"role": "user", "content": "hi"},
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": "be kind"}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "see"},
            {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
            {"type": "input_file", "file_id": "file_1"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "id": "msg_9", "status": "completed",
         "content": [{"type": "output_text", "text": "calling", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}",
         "id": "fc_9", "status": "completed"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"a\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "two"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "refusal", "refusal": "no"}]},
    ]
    assert to_messages(items) == [
        {"role": "user", "content": "hi"},
        {"role": "developer", "content": "be kind"},
        {"role": "user", "content": [
            {"type": "text", "text": "see"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
            {"type": "file", "file": {"file_id": "file_1"}}]},
        {"role": "assistant", "content": "calling", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{\"a\":1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "assistant", "content": None, "refusal": "no"},
    ]
    assert to_messages("just text") == [{"role": "user", "content": "just text"}]


@pytest.mark.parametrize(("items", "param", "code"), [
    ("x" and 5, "input", "invalid_value"),
    ([5], "input[0]", "invalid_value"),
    ([{"type": "mystery"}], "input[0].type", "invalid_value"),
    ([{"type": "web_search_call", "id": "ws_1"}], "input[0].type", "unsupported_value"),
    ([{"type": "item_reference", "id": "msg_1"}], "input[0].type", "unsupported_value"),
    ([{"role": "tool", "content": "x"}], "input[0].role", "invalid_value"),
    ([{"role": "user", "content": 5}], "input[0].content", "invalid_value"),
    ([{"role": "user", "content": [{"type": "input_video"}]}], "input[0].content[0].type",
     "invalid_value"),
    ([{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}],
     "input[0].content[0].file_id", "unsupported_value"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id",
     "missing_required_parameter"),
    ([{"type": "function_call_output", "call_id": "c"}], "input[0].output",
     "missing_required_parameter"),
])
def test_a_bad_item_is_a_400_naming_it(items: Any, param: str, code: str) -> None:
    with pytest.raises(BadRequest) as refused:
        to_messages(items)
    assert (refused.value.param, refused.value.code) == (param, code)


def test_item_ids_name_their_message_and_call() -> None:
    message = {"role": "assistant", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    assert [i["id"] for i in to_items(message, ItemIds("42"))] == ["msg_42", "fc_42_0"]
    assert parse_item_id("msg_42") == (42, None)
    assert parse_item_id("fc_42_0") == (42, 0)
    for wrong in ("msg_", "msg_x", "fc_42", "fc_42_", "fc_x_1", "resp_1", "msg_٣",
                  "msg_" + "9" * 19):
        assert parse_item_id(wrong) is None, wrong
