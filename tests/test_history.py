"""The trimming rules of contract §7: examples, then properties over any history and budget."""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.history import _by_units, budget, trim, units
from proxy.store.messages import stored


@dataclass(frozen=True)
class Msg:
    role: str
    tokens: int = 10
    calls: tuple[str | None, ...] = ()
    answers: str | None = None
    label: str = ""


def user(label: str = "u", tokens: int = 10) -> Msg:
    return Msg("user", tokens, label=label)


def reply(label: str = "a", tokens: int = 10) -> Msg:
    return Msg("assistant", tokens, label=label)


def calling(*ids: str | None, tokens: int = 10) -> Msg:
    return Msg("assistant", tokens, calls=ids, label="calls:" + ",".join(map(str, ids)))


def result(call_id: str | None, tokens: int = 10) -> Msg:
    return Msg("tool", tokens, answers=call_id, label=f"result:{call_id}")


# --- examples ---------------------------------------------------------------------------------


def test_everything_fits_is_injected_whole() -> None:
    window = [user("1"), reply("2"), user("3"), reply("4")]
    trimmed = trim(window, 1000)
    assert trimmed.messages == window
    assert (trimmed.tokens, trimmed.dropped) == (40, 0)


def test_oldest_units_are_dropped_first_until_the_budget_fits() -> None:
    window = [user("1"), reply("2"), user("3"), reply("4")]
    trimmed = trim(window, 25)
    assert trimmed.messages == window[2:]
    assert (trimmed.tokens, trimmed.dropped) == (20, 2)


def test_max_history_tokens_is_a_second_limit() -> None:
    window = [user("1"), reply("2"), user("3"), reply("4")]
    assert trim(window, 1000, 15).messages == [window[3]]
    assert trim(window, 15, 1000).messages == [window[3]]
    assert trim(window, 1000, 0).messages == []


def test_dropping_stops_at_the_first_unit_that_does_not_fit() -> None:
    """A suffix: a small old unit is not pulled in past a large newer one that was dropped."""
    window = [user("small", 1), reply("big", 100), user("new", 5)]
    trimmed = trim(window, 50)
    assert trimmed.messages == [window[2]]
    assert trimmed.dropped == 2


def test_a_tool_exchange_is_kept_or_dropped_whole() -> None:
    exchange = [calling("c1", "c2"), result("c1"), result("c2")]
    window = [user("q"), *exchange, reply("answer")]
    assert trim(window, 40).messages == [*exchange, window[-1]]
    assert trim(window, 39).messages == [window[-1]]  # the exchange costs 30: all of it or none


def test_history_never_starts_with_a_tool_message_cut_by_the_window() -> None:
    """The window's edge fell inside an exchange: its answers lost their assistant."""
    window = [result("c1"), result("c2"), reply("answer"), user("next")]
    trimmed = trim(window, 1000)
    assert trimmed.messages == window[2:]
    assert trimmed.dropped == 2


def test_a_broken_exchange_in_the_middle_is_left_out() -> None:
    """Tool calls never answered (the client moved on, or the reply was cut off mid-stream)
    would make the upstream refuse every later turn."""
    window = [user("q"), calling("c1"), user("never mind"), reply("ok")]
    trimmed = trim(window, 1000)
    assert trimmed.messages == [window[0], window[2], window[3]]
    assert trimmed.dropped == 1


def test_a_partly_answered_exchange_is_left_out_with_its_answers() -> None:
    window = [user("q"), calling("c1", "c2"), result("c1"), user("next"), reply("ok")]
    assert trim(window, 1000).messages == [window[0], window[3], window[4]]


def test_a_call_without_an_id_can_never_be_answered() -> None:
    """A stream cut off before the call's id arrived."""
    window = [user("q"), calling(None), result(None), user("next")]
    assert trim(window, 1000).messages == [window[0], window[3]]


def test_answers_interleaved_by_concurrent_turns_are_orphans() -> None:
    """Another turn landed between an exchange's assistant and its answers."""
    window = [calling("c1"), user("other"), reply("other answer"), result("c1"), reply("final")]
    trimmed = trim(window, 1000)
    assert trimmed.messages == [window[1], window[2], window[4]]
    assert trimmed.dropped == 2


def test_a_tool_message_answering_another_call_is_an_orphan() -> None:
    window = [calling("c1"), result("c1"), result("c1"), result("zz"), reply("done")]
    assert trim(window, 1000).messages == [window[0], window[1], window[4]]


def test_the_newest_open_exchange_is_dropped_unless_the_request_continues_it() -> None:
    window = [user("weather?"), calling("c1")]
    assert trim(window, 1000).messages == [window[0]]
    assert trim(window, 1000, continued=True).messages == window


def test_the_exchange_a_request_continues_is_kept_over_the_budget() -> None:
    """Without it the request's own tool results would be orphans the upstream refuses."""
    window = [user("weather?", 5), calling("c1", tokens=50)]
    trimmed = trim(window, 20, continued=True)
    assert trimmed.messages == [window[1]]
    assert (trimmed.tokens, trimmed.dropped) == (50, 1)
    assert trim(window, 60, 20, continued=True).messages == [window[1]]


def test_continued_pins_only_a_tool_exchange() -> None:
    window = [user("q", 5), reply("a", 50)]
    assert trim(window, 20, continued=True).messages == []


def test_legacy_function_results_stay_with_their_assistant() -> None:
    window = [Msg("function", label="orphan"), user("q"), reply("call"), Msg("function")]
    assert trim(window, 1000).messages == window[1:]


def test_units_of_a_well_formed_history() -> None:
    window = [user("q"), calling("a", "b"), result("b"), result("a"), reply("r")]
    assert units(window) == [[window[0]], window[1:4], [window[4]]]


def test_budget_is_context_minus_output_reserve_minus_the_request() -> None:
    assert budget(8192, 1000, 192) == 7000
    assert budget(100, 1000, 10) == 0


def test_stored_reads_tool_ids_from_the_body_only_when_needed() -> None:
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"type": "function", "function": {"name": "g", "arguments": "{"}},
    ]}
    assert stored(1, "assistant", True, 9, json.dumps(call)).calls == ("call_1", None)
    answer = json.dumps({"role": "tool", "tool_call_id": "call_1", "content": "\ud800 \x00"})
    assert stored(2, "tool", False, 9, answer).answers == "call_1"
    plain = stored(3, "user", False, 9, "not even json")  # never decoded
    assert (plain.calls, plain.answers) == ((), None)


# --- properties -------------------------------------------------------------------------------

tokens = st.integers(min_value=0, max_value=60)


@st.composite
def exchanges(draw: st.DrawFn) -> list[Msg]:
    """One stored run: a plain message, or a tool exchange that may be broken in any way."""
    kind = draw(st.sampled_from(["user", "reply", "tools", "orphan"]))
    if kind == "user":
        return [user(tokens=draw(tokens))]
    if kind == "reply":
        return [reply(tokens=draw(tokens))]
    if kind == "orphan":
        return [result(draw(st.sampled_from(["c1", "zz", None])), draw(tokens))]
    ids = draw(st.lists(st.sampled_from(["c1", "c2", "c3", None]), min_size=1, max_size=3))
    answered = draw(st.lists(st.sampled_from(["c1", "c2", "c3", "zz", None]), max_size=4))
    if draw(st.booleans()):
        answered = [i for i in ids if i is not None]  # the usual case: all answered, in order
    return [calling(*ids, tokens=draw(tokens)), *(result(i, draw(tokens)) for i in answered)]


histories = st.lists(exchanges(), max_size=12).map(lambda runs: [m for r in runs for m in r])


def valid_for_upstream(messages: list[Msg], continued: bool) -> bool:
    """What an OpenAI-compatible upstream checks: every tool message answers a call of the
    assistant message its run follows, and every call is answered before anything else."""
    pending: set[str | None] = set()
    for message in messages:
        if message.role == "tool":
            if message.answers is None or message.answers not in pending:
                return False
            pending.discard(message.answers)
            continue
        if pending:
            return False
        pending = set(message.calls)
    return not pending or continued


@settings(max_examples=400, deadline=None)
@given(
    history=histories,
    window_size=st.integers(min_value=0, max_value=40),
    limit=st.integers(min_value=0, max_value=400),
    max_tokens=st.none() | st.integers(min_value=0, max_value=400),
    continued=st.booleans(),
)
def test_injected_history_is_a_valid_suffix_of_whole_units_within_the_budget(
    history: list[Msg], window_size: int, limit: int, max_tokens: int | None, continued: bool
) -> None:
    window = history[len(history) - window_size :] if window_size else []
    trimmed = trim(window, limit, max_tokens, continued=continued)
    parts = units(window, continued=continued)

    # a suffix of whole units
    kept = 0
    while sum(len(u) for u in parts[len(parts) - kept :]) < len(trimmed.messages):
        kept += 1
    suffix = parts[len(parts) - kept :] if kept else []
    assert trimmed.messages == [m for u in suffix for m in u]
    # never starts with a tool message, and the upstream would accept it
    assert not trimmed.messages or trimmed.messages[0].role not in ("tool", "function")
    assert valid_for_upstream(trimmed.messages, continued)
    # the counts the headers report
    assert trimmed.tokens == sum(m.tokens for m in trimmed.messages)
    assert trimmed.dropped == len(window) - len(trimmed.messages)
    # fits the budget and max_history_tokens (the exchange a request continues is the one
    # unit allowed over it), and takes as much as fits
    cap = limit if max_tokens is None else min(limit, max_tokens)
    if continued and parts and parts[-1][0].calls:
        newest = sum(m.tokens for m in parts[-1])
        assert suffix and suffix[-1] == parts[-1]
        assert trimmed.tokens <= cap or (len(suffix) == 1 and newest > cap)
    else:
        assert trimmed.tokens <= cap
    if kept < len(parts):
        assert trimmed.tokens + sum(m.tokens for m in parts[-kept - 1]) > cap


@settings(max_examples=300, deadline=None)
@given(
    tokens=st.lists(st.integers(min_value=0, max_value=60), max_size=30),
    roles=st.lists(st.sampled_from(["user", "assistant", "system", "developer"]), min_size=30),
    limit=st.integers(min_value=0, max_value=400),
    max_tokens=st.none() | st.integers(min_value=0, max_value=400),
    continued=st.booleans(),
)
def test_a_window_without_tool_messages_trims_as_the_unit_rules_do(
    tokens: list[int], roles: list[str], limit: int, max_tokens: int | None, continued: bool
) -> None:
    """The shortcut for windows without tool calls or results agrees with the general rules."""
    pairs = enumerate(zip(roles, tokens, strict=False))
    window = [Msg(role, t, label=f"m{i}") for i, (role, t) in pairs]
    cap = limit if max_tokens is None else min(limit, max_tokens)
    assert trim(window, limit, max_tokens, continued=continued) == _by_units(
        window, cap, continued
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(exchanges(), max_size=10), st.integers(min_value=0, max_value=40))
def test_a_well_formed_history_loses_nothing_but_the_window_edge(
    runs: list[list[Msg]], window_size: int
) -> None:
    """With every exchange complete and no orphans, only the window's edge is ever left out."""
    good = [
        r for r in runs
        if r[0].role != "tool"
        and [m.answers for m in r[1:]] == [i for i in r[0].calls if i is not None]
        and None not in r[0].calls
        and len(set(r[0].calls)) == len(r[0].calls)
    ]
    history = [m for r in good for m in r]
    window = history[len(history) - window_size :] if window_size else []
    trimmed = trim(window, 10**9)
    lead = 0
    while lead < len(window) and window[lead].role == "tool":
        lead += 1
    assert trimmed.messages == window[lead:]
