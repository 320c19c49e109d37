"""Recognising resent history (proxy/overlap.py): examples, then properties over any history.

The stored side is built with `proxy.store.messages.stored`, exactly as the turn's read builds it
(a JSON body, its role and tool-call flag as columns).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import codec
from proxy.overlap import find, key, stored_key, stored_since
from proxy.store.messages import Stored, stored


def as_stored(*messages: dict[str, Any]) -> list[Stored]:
    return [
        stored(i, m["role"], m["role"] == "assistant" and bool(m.get("tool_calls")), 5,
               codec.dumps_text(m))
        for i, m in enumerate(messages, 1)
    ]


def u(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def calling(call_id: str, city: str = "Paris") -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function",
         "function": {"name": "weather", "arguments": json.dumps({"city": city})}}]}


def result(call_id: str, text: str = "sunny") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


# --- find: examples ---------------------------------------------------------------------------


def test_a_new_message_alone_is_no_overlap() -> None:
    assert find([u("and now?")], as_stored(u("hi"), a("hello"))) == 0
    assert find([u("hi")], as_stored(u("hi"), a("hello"))) == 0  # the same words, asked again
    assert find([u("hi")], []) == 0


def test_a_tool_loops_second_call_resends_the_user_message_and_the_call() -> None:
    history = as_stored(u("older"), a("reply"), u("weather?"), calling("call_1"))
    assert find([u("weather?"), calling("call_1"), result("call_1")], history) == 2


def test_a_whole_conversation_resent_is_recognised_whole() -> None:
    history = as_stored(u("1"), a("2"), u("3"), a("4"))
    assert find([u("1"), a("2"), u("3"), a("4"), u("5")], history) == 4
    assert find([u("1"), a("2"), u("3"), a("4")], history) == 4  # nothing new at all


def test_the_longest_run_wins() -> None:
    history = as_stored(u("x"), a("y"), u("x"), a("y"))
    assert find([u("x"), a("y"), u("x"), a("y"), u("z")], history) == 4
    assert find([u("x"), a("y"), u("z")], history) == 2


def test_a_run_that_only_partly_matches_is_no_overlap() -> None:
    history = as_stored(u("1"), a("2"), u("3"), a("4"))
    assert find([u("1"), a("2"), u("edited"), u("5")], history) == 0  # not the newest messages
    assert find([u("3"), a("4, edited"), u("5")], history) == 0
    assert find([u("3"), u("5")], history) == 0


def test_another_call_id_is_another_exchange() -> None:
    history = as_stored(u("weather?"), calling("call_1"))
    assert find([u("weather?"), calling("call_2"), result("call_2")], history) == 0


def test_what_sdks_add_or_reshape_is_ignored() -> None:
    """Null fields SDKs add, another key order, fields upstreams return but take no part in."""
    call = calling("call_1")
    history = as_stored(u("weather?"), call)
    resent_call = {
        "tool_calls": [{"type": "function", "id": "call_1", "index": 0, "function": {
            "arguments": '{ "city" :  "Paris" }', "name": "weather"}}],  # re-serialised args
        "refusal": None, "annotations": [], "audio": None, "function_call": None,
        "parsed": None, "content": "", "role": "assistant", "name": None,
    }
    assert find([{"content": "weather?", "role": "user", "name": None}, resent_call,
                 result("call_1")], history) == 2
    assert key(resent_call) == key(call)
    assert key({"role": "assistant", "content": "x", "tool_calls": []}) == key(a("x"))


def test_content_is_compared_exactly_parts_included() -> None:
    parts = [{"type": "text", "text": "look"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}]
    same = [{"text": "look", "type": "text"},
            {"image_url": {"url": "data:image/png;base64,AAA"}, "type": "image_url"}]
    assert key({"role": "user", "content": parts}) == key({"role": "user", "content": same})
    assert key({"role": "user", "content": parts}) != key({"role": "user", "content": parts[:1]})
    assert key(u("look")) != key({"role": "user", "content": parts[:1]})  # a string is no array
    assert key(u("Look")) != key(u("look")) and key(u("a ")) != key(u("a"))
    assert key(a("")) != key({"role": "assistant", "content": None})  # "" is null only beside calls
    numbers = {key({"role": "user", "content": [{"type": "text", "n": n}]}) for n in (1, 1.0, True)}
    assert len(numbers) == 3  # JSON's 1, 1.0 and true differ


def test_name_tool_call_id_and_function_call_count() -> None:
    assert key({**u("hi"), "name": "ada"}) != key(u("hi"))
    assert key({**u("hi"), "name": None}) == key(u("hi"))
    assert key(result("call_1")) != key(result("call_2"))
    old = {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}
    assert key(old) != key({**old, "function_call": {"name": "g", "arguments": "{}"}})
    assert key({**a("x"), "audio": {"id": "audio_1", "data": "..."}}) == key(
        {**a("x"), "audio": {"id": "audio_1"}})
    assert key({**a("x"), "audio": {"id": "audio_1"}}) != key(
        {**a("x"), "audio": {"id": "audio_2"}})


def test_arguments_that_are_not_json_are_compared_as_text() -> None:
    def args(text: str) -> dict[str, Any]:
        return {"role": "assistant", "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": text}}]}
    assert key(args("{not json")) == key(args("{not json"))
    assert key(args("{not json")) != key(args("{not  json"))
    assert key(args('"x"')) != key(args("x"))


def test_a_stored_body_with_lone_surrogates_is_compared_exactly() -> None:
    message = u("odd \ud800 \x00 text")
    (one,) = as_stored(message)
    assert "\\ud800" in one.body
    assert stored_key(one) == key(message)
    assert find([message, u("next")], as_stored(a("x"), message)) == 1


def test_stored_bodies_are_decoded_only_where_roles_line_up() -> None:
    """A stored message whose kind cannot match is never decoded (here it could not be)."""
    garbage = Stored(1, "assistant", False, 5, "not even json")
    assert find([u("new")], [garbage]) == 0
    tool_garbage = Stored(1, "user", False, 5, "not json either")
    assert find([u("q"), a("r")], [tool_garbage, *as_stored(u("q"), a("r"))]) == 2


# --- stored_since: a concurrent turn stored the same messages first ---------------------------


def test_stored_since_counts_the_new_messages_another_turn_already_stored() -> None:
    since = as_stored(result("call_1"), a("sunny, they say"))
    assert stored_since([result("call_1")], since) == 1
    assert stored_since([result("call_1"), u("and tomorrow?")], since) == 1
    assert stored_since([u("something else")], since) == 0
    assert stored_since([result("call_1")], []) == 0


# --- properties -------------------------------------------------------------------------------

# A small alphabet, so that runs repeat and many candidate overlaps exist.
MESSAGES = [u("x"), u("y"), a("x"), a("y"), calling("c1"), calling("c2"), result("c1"),
            result("c2"), {"role": "user", "content": [{"type": "text", "text": "x"}]}]


@st.composite
def presented(draw: st.DrawFn, message: dict[str, Any]) -> dict[str, Any]:
    """`message` as some SDK might send it: keys reordered, null fields added."""
    noise = draw(st.dictionaries(
        st.sampled_from(["refusal", "annotations", "audio", "function_call", "name", "parsed"]),
        st.sampled_from([None, []]), max_size=3))
    noise = {k: v for k, v in noise.items() if v is None or k == "annotations"}
    items = [*message.items(), *noise.items()]
    order = draw(st.permutations(items))
    return dict(order)


indices = st.lists(st.integers(min_value=0, max_value=len(MESSAGES) - 1), max_size=14)
# Four messages of two roles only: runs repeat often and nearly match.
few = st.lists(st.sampled_from([0, 2, 4, 6]), max_size=16)


def brute_force(request: list[dict[str, Any]], history: list[dict[str, Any]]) -> int:
    for k in range(min(len(request), len(history)), 0, -1):
        if [key(m) for m in request[:k]] == [key(m) for m in history[len(history) - k:]]:
            return k
    return 0


@settings(max_examples=500, deadline=None)
@given(history=st.one_of(indices, few), extra=st.one_of(indices, few), data=st.data())
def test_find_is_the_longest_suffix_of_the_history_that_opens_the_request(
    history: list[int], extra: list[int], data: st.DataObject
) -> None:
    # Mostly a request that opens with part of the history (so that runs nearly match), some
    # requests drawn on their own.
    cut = data.draw(st.integers(min_value=0, max_value=len(history)))
    start = data.draw(st.integers(min_value=cut, max_value=len(history)))
    request = history[cut:start] + extra
    sent = [data.draw(presented(MESSAGES[i])) for i in request]
    found = find(sent, as_stored(*(MESSAGES[i] for i in history)))
    assert found == brute_force([MESSAGES[i] for i in request], [MESSAGES[i] for i in history])
    assert request[:found] == history[len(history) - found:]  # the same messages, in order


@settings(max_examples=200, deadline=None)
@given(history=indices, new=indices, data=st.data())
def test_a_client_that_resends_any_suffix_is_recognised_at_least_that_far(
    history: list[int], new: list[int], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=len(history)))
    resent = [MESSAGES[i] for i in history[cut:]]
    sent = [data.draw(presented(m)) for m in [*resent, *(MESSAGES[i] for i in new)]]
    assert find(sent, as_stored(*(MESSAGES[i] for i in history))) >= len(resent)


@settings(max_examples=200, deadline=None)
@given(new=indices, since=indices)
def test_stored_since_is_the_common_prefix(new: list[int], since: list[int]) -> None:
    count = stored_since([MESSAGES[i] for i in new], as_stored(*(MESSAGES[i] for i in since)))
    assert new[:count] == since[:count]
    assert count == min(len(new), len(since)) or new[count] != since[count]
