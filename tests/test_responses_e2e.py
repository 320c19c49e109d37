"""End to end: the Responses and Conversations APIs on a live `chatproxy serve`, driven by the
official `openai` SDK and the OpenAI Agents SDK (its default Responses model), with the fake
Chat Completions upstream (tests/fake_upstream.py) recording what it was sent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests import test_e2e
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.e2e

# The live server, its fake upstream and clients on it: tests/test_e2e.py's fixtures.
fake, proxy, sdk, api = test_e2e.fake, test_e2e.proxy, test_e2e.sdk, test_e2e.api


def last(fake: FakeUpstream) -> Any:
    return fake.requests[-1].body


def contents(body: Any) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content")) for m in body["messages"]]


# --- responses.create / retrieve / input_items / delete ---------------------------------------


async def test_the_sdk_creates_retrieves_lists_and_deletes_responses(
    sdk: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    first = await sdk.responses.create(model="fake-echo", input="my name is Ada",
                                       instructions="Be terse.", metadata={"run": "1"})
    assert first.output_text == "echo: my name is Ada"
    assert (first.status, first.instructions, first.metadata) == ("completed", "Be terse.",
                                                                 {"run": "1"})
    assert first.usage is not None and first.usage.total_tokens == 15
    assert contents(last(fake)) == [("system", "Be terse."), ("user", "my name is Ada")]

    second = await sdk.responses.create(model="fake-echo", input="what is my name?",
                                        previous_response_id=first.id)
    assert contents(last(fake)) == [("user", "my name is Ada"),
                                    ("assistant", "echo: my name is Ada"),
                                    ("user", "what is my name?")]
    assert second.previous_response_id == first.id

    got = await sdk.responses.retrieve(second.id)
    assert got.model_dump() == second.model_dump()
    inputs = await sdk.responses.input_items.list(second.id)
    assert [i.model_dump(exclude_none=True)["content"] for i in inputs.data] == [
        [{"type": "input_text", "text": "what is my name?"}]]
    await sdk.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(second.id)


async def test_a_streamed_response_has_every_event_in_order_and_is_stored_first(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient
) -> None:
    kinds, numbers = [], []
    async with sdk.responses.stream(model="fake-echo", input="stream me please") as stream:
        async for event in stream:
            kinds.append(event.type)
            numbers.append(event.sequence_number)
            if event.type == "response.completed":
                # the turn is stored before the completed event is sent
                stored = await api.get(f"/v1/responses/{event.response.id}")
                assert stored.status_code == 200 and stored.json()["status"] == "completed"
        final = await stream.get_final_response()
    assert final.output_text == "echo: stream me please"
    assert numbers == list(range(len(numbers)))
    deltas = kinds.count("response.output_text.delta")
    assert deltas == 4  # one per upstream chunk ("echo:", " stream", " me", " please")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]


async def test_top_logprobs_come_back_on_the_output_text_whole_and_streamed(
    sdk: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    include: Any = ["message.output_text.logprobs"]
    whole = await sdk.responses.create(model="fake-echo", input="two words", top_logprobs=2,
                                       include=include)
    assert (last(fake)["logprobs"], last(fake)["top_logprobs"]) == (True, 2)
    (part,) = whole.output[0].content  # type: ignore[union-attr]
    assert part.type == "output_text" and part.logprobs is not None
    assert [p.token for p in part.logprobs] == ["echo:", " two", " words"]
    assert [t.token for t in part.logprobs[1].top_logprobs] == [" two", "?"]
    assert part.logprobs[1].logprob == -0.5 and part.logprobs[1].bytes == list(b" two")

    deltas = []
    async with sdk.responses.stream(model="fake-echo", input="two words", top_logprobs=1,
                                    include=include) as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append([p.token for p in event.logprobs])
            elif event.type == "response.output_text.done":
                done = [p.token for p in event.logprobs]
        final = await stream.get_final_response()
    assert deltas == [["echo:"], [" two"], [" words"]]
    assert done == ["echo:", " two", " words"]
    (streamed,) = final.output[0].content  # type: ignore[union-attr]
    assert [p.token for p in streamed.logprobs or []] == done
    # `include` alone: the chosen tokens' own; neither: none.
    alone = await sdk.responses.create(model="fake-echo", input="two words", include=include)
    assert last(fake)["logprobs"] is True and "top_logprobs" not in last(fake)
    (part,) = alone.output[0].content  # type: ignore[union-attr]
    assert [(p.token, p.top_logprobs) for p in part.logprobs or []] == [
        ("echo:", []), (" two", []), (" words", [])]
    plain = await sdk.responses.create(model="fake-echo", input="two words")
    assert "logprobs" not in last(fake)
    assert not plain.output[0].content[0].logprobs  # type: ignore[union-attr]


async def test_streamed_function_calls_have_their_argument_events(
    sdk: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    tool = {"type": "function", "name": "get_weather", "strict": False,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    kinds = []
    async with sdk.responses.stream(model="fake-tools", input="Paris",
                                    tools=[tool]) as stream:  # type: ignore[list-item]
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_response()
    assert last(fake)["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": tool["parameters"], "strict": False}}]
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta",
                     "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]
    answer = await sdk.responses.create(
        model="fake-tools", previous_response_id=final.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert answer.output_text == "The weather is sunny."
    assert [m["role"] for m in last(fake)["messages"]] == ["user", "assistant", "tool"]
    assert last(fake)["messages"][1]["tool_calls"][0]["id"] == call.call_id


async def test_a_stream_cut_short_is_stored_incomplete(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient
) -> None:
    conversation = await sdk.conversations.create()
    kinds, response_id = [], None
    async with sdk.responses.stream(model="fake-break", input="go",
                                    conversation=conversation.id) as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.created":
                response_id = event.response.id
    assert kinds[-1] == "response.incomplete"
    stored = (await api.get(f"/v1/responses/{response_id}")).json()
    assert (stored["status"], stored["output"][0]["status"]) == ("incomplete", "incomplete")
    assert stored["output"][0]["content"][0]["text"] == "Hello, wor"
    messages = (await api.get(f"/v1/chat/sessions/{conversation.id}/messages")).json()["data"]
    assert [(m["role"], m["content"], m["status"]) for m in messages] == [
        ("user", "go", "complete"), ("assistant", "Hello, wor", "incomplete")]


async def test_a_client_that_leaves_a_stream_early_leaves_an_incomplete_response(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, fake: FakeUpstream
) -> None:
    response_id, seen = None, ""
    async with sdk.responses.stream(model="fake-slow", input="count") as stream:
        async for event in stream:
            if event.type == "response.created":
                response_id = event.response.id
            if event.type == "response.output_text.delta":
                seen += event.delta
                if seen.count("tick") == 3:
                    break
    number = fake.requests[-1].number

    async def stored() -> dict[str, Any] | None:
        got = await api.get(f"/v1/responses/{response_id}")
        return got.json() if got.status_code == 200 else None

    kept = await test_e2e.eventually(stored)
    assert kept is not None and kept["status"] == "incomplete"
    text = kept["output"][0]["content"][0]["text"]
    assert text.startswith(seen) and set(text.split()) == {"tick"}

    async def upstream_closed() -> bool:
        return number in fake.disconnected

    assert await test_e2e.eventually(upstream_closed, within=5)
    # the cut reply is in the next response's history
    await sdk.responses.create(model="fake-echo", input="next", previous_response_id=response_id)
    assert contents(last(fake)) == [("user", "count"), ("assistant", text), ("user", "next")]


# --- conversations ------------------------------------------------------------------------------


async def test_a_conversation_goes_on_through_either_api_and_is_listed_as_a_session(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, fake: FakeUpstream
) -> None:
    conversation = await sdk.conversations.create(
        items=[{"type": "message", "role": "user", "content": "I like tea"}],
        metadata={"app": "e2e"})
    await sdk.responses.create(model="fake-echo", conversation=conversation.id,
                               input="and you?")
    assert contents(last(fake)) == [("user", "I like tea"), ("user", "and you?")]
    chat = await sdk.chat.completions.create(
        model="fake-echo", messages=[{"role": "user", "content": "via chat"}],
        extra_body={"session_id": conversation.id})
    assert chat.choices[0].message.content == "echo: via chat"
    reply = await sdk.responses.create(model="fake-echo", conversation={"id": conversation.id},
                                       input="back to responses")
    assert contents(last(fake)) == [
        ("user", "I like tea"), ("user", "and you?"), ("assistant", "echo: and you?"),
        ("user", "via chat"), ("assistant", "echo: via chat"), ("user", "back to responses")]
    assert reply.conversation is not None and reply.conversation.id == conversation.id

    listed = (await api.get("/v1/chat/sessions")).json()["data"]
    assert conversation.id in [s["id"] for s in listed]
    exported = (await api.get(f"/v1/chat/sessions/{conversation.id}/export")).json()
    assert len(exported["messages"]) == 7 and exported["session"]["metadata"] == {"app": "e2e"}

    page = await sdk.conversations.items.list(conversation.id, order="asc", limit=3)
    assert [i.type for i in page.data] == ["message"] * 3
    everything = [i async for i in sdk.conversations.items.list(conversation.id, order="asc",
                                                                limit=3)]
    assert len(everything) == 7
    item = await sdk.conversations.items.retrieve(everything[1].id,
                                                  conversation_id=conversation.id)
    assert item.model_dump() == everything[1].model_dump()
    await sdk.conversations.items.delete(everything[1].id, conversation_id=conversation.id)
    assert len([i async for i in sdk.conversations.items.list(conversation.id)]) == 6
    updated = await sdk.conversations.update(conversation.id, metadata={"app": "two"})
    assert updated.metadata == {"app": "two"}
    deleted = await sdk.conversations.delete(conversation.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await sdk.conversations.retrieve(conversation.id)


async def test_a_response_with_both_histories_is_refused_and_stores_nothing(
    sdk: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    conversation = await sdk.conversations.create()
    seen = len(fake.requests)
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk.responses.create(model="fake-echo", input="x", conversation=conversation.id,
                                   previous_response_id="resp_abc")
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert len(fake.requests) == seen
    assert [i async for i in sdk.conversations.items.list(conversation.id)] == []



# --- the OpenAI Agents SDK, with its default (Responses) model -----------------------------------


@pytest.fixture
def agents_client(sdk: openai.AsyncOpenAI) -> Iterator[None]:
    """The Agents SDK's default client pointed at chatproxy (its default API: Responses)."""
    import agents
    from agents.models import _openai_shared

    agents.set_default_openai_client(sdk, use_for_tracing=False)
    agents.set_tracing_disabled(True)
    try:
        yield
    finally:
        _openai_shared._default_openai_client = None


def weather_agent() -> Any:
    import agents

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny" if city == "Paris" else "unknown"

    return agents.Agent(name="weather", instructions="Answer with the weather.",
                        model="fake-tools", tools=[get_weather])


async def test_the_agents_sdk_runs_a_tool_round_trip_in_a_conversation(
    agents_client: None, sdk: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    from agents import Runner

    conversation = await sdk.conversations.create()
    seen = len(fake.requests)
    result = await Runner.run(weather_agent(), "Paris", conversation_id=conversation.id)
    assert result.final_output == "The weather is sunny."
    first, second = [r.body for r in fake.requests[seen:]]
    assert contents(first) == [("system", "Answer with the weather."), ("user", "Paris")]
    assert first["tools"][0]["function"]["name"] == "get_weather"
    call = second["messages"][2]["tool_calls"][0]
    assert contents(second) == [("system", "Answer with the weather."), ("user", "Paris"),
                                ("assistant", None), ("tool", "sunny")]
    assert second["messages"][3]["tool_call_id"] == call["id"]
    kinds = [i.type async for i in sdk.conversations.items.list(conversation.id, order="asc")]
    assert kinds == ["message", "function_call", "function_call_output", "message"]

    # the next run in the same conversation sees the whole exchange
    await Runner.run(weather_agent(), "Paris", conversation_id=conversation.id)
    assert [m["role"] for m in last(fake)["messages"]] == [
        "system", "user", "assistant", "tool", "assistant", "user", "assistant", "tool"]


async def test_the_agents_sdk_chains_responses_with_previous_response_id(
    agents_client: None, fake: FakeUpstream
) -> None:
    from agents import Runner

    seen = len(fake.requests)
    first = await Runner.run(weather_agent(), "Paris")
    assert first.final_output == "The weather is sunny."
    assert first.last_response_id is not None
    second = await Runner.run(weather_agent(), "Rome", previous_response_id=first.last_response_id)
    assert second.final_output == "The weather is unknown."
    bodies = [r.body for r in fake.requests[seen:]]
    assert len(bodies) == 4
    assert contents(bodies[3])[1:] == [
        ("user", "Paris"), ("assistant", None), ("tool", "sunny"),
        ("assistant", "The weather is sunny."), ("user", "Rome"), ("assistant", None),
        ("tool", "unknown")]
