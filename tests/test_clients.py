"""Real clients that keep their own history, end to end (contract §6, README "Clients that keep
their own history"): the OpenAI Agents SDK's Runner, LangChain's ChatOpenAI with a tool loop,
and openai-python's `.stream()` and `.parse()` helpers, each used the way its documentation
shows, against a live `chatproxy serve` with a session.

The upstream (tests/strict_upstream.py) refuses what OpenAI refuses (a tool message that answers
no call, a call left unanswered, a message sent twice), so each test checks that the upstream saw
every message exactly once, and that the session stores each message once, in order.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import UPSTREAM_KEY, User
from tests.fault_helpers import Serve, serve_env, serving
from tests.strict_upstream import StrictUpstream, conversation_problem, identity

pytestmark = pytest.mark.e2e

MODEL = "gpt-4o-mini"
PARIS, ROME, OSLO = ("What is the weather in Paris?", "And in Rome?", "And in Oslo?")


@pytest.fixture(scope="module")
def strict() -> Iterator[StrictUpstream]:
    with StrictUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def proxy(
    database_url: str, strict: StrictUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Serve]:
    workdir = tmp_path_factory.mktemp("chatproxy-clients")
    env = serve_env(database_url, strict.base_url, workdir,
                    CHATPROXY_UPSTREAM_API_KEY=UPSTREAM_KEY, CHATPROXY_LOG_LEVEL="warning")
    with serving(env, workdir / "chatproxy.log") as server:
        yield server


@pytest.fixture
async def api(proxy: Serve, alice: User) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=proxy.url, headers=alice.headers, timeout=30) as client:
        yield client


@pytest.fixture
async def sid(api: httpx.AsyncClient) -> str:
    r = await api.post("/v1/chat/sessions", json={"system_prompt": "You are terse."})
    assert r.status_code == 201, r.text
    session: str = r.json()["id"]
    return session


@pytest.fixture
async def sdk(proxy: Serve, alice: User) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=alice.key, max_retries=0)
    yield client
    await client.close()


def weather(city: str) -> str:
    return f"sunny in {city}"


async def stored(api: httpx.AsyncClient, sid: str) -> list[dict[str, Any]]:
    r = await api.get(f"/v1/chat/sessions/{sid}/messages", params={"limit": 500})
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["data"]
    return found


async def check_conversation(
    api: httpx.AsyncClient, strict: StrictUpstream, sid: str, first_request: int,
    questions: tuple[str, ...], *, tools: bool = True,
) -> None:
    """The upstream saw every message exactly once, and the session holds each once, in order:
    per question, the question, the tool call, its result and the answer (or the question and
    the echo)."""
    assert strict.violations_since(first_request) == []
    bodies = strict.bodies_since(first_request)
    assert [conversation_problem(b["messages"]) for b in bodies] == [None] * len(bodies)
    messages = await stored(api, sid)
    shapes = []
    for m in messages:
        call = (m.get("tool_calls") or [{}])[0].get("function", {}).get("arguments")
        shapes.append((m["role"], m["content"] if call is None else call))
    expected: list[tuple[str, Any]] = []
    for question in questions:
        city = question.rstrip("?").split(" ")[-1]
        if tools:
            expected += [("user", question), ("assistant", f'{{"city":"{city}"}}'),
                         ("tool", weather(city)), ("assistant", f"The weather: {weather(city)}.")]
        else:
            expected += [("user", question), ("assistant", f"echo: {question}")]
    assert shapes == expected
    # The last request carried the whole conversation (the history and what the client sent),
    # each message once: all that is stored but the reply it got.
    last = [m for m in bodies[-1]["messages"] if m["role"] not in ("system", "developer")]
    assert [identity(m) for m in last] == [identity(m) for m in messages[:-1]]


# --- the OpenAI Agents SDK ------------------------------------------------------------------


def agent_for(sdk: openai.AsyncOpenAI, session_by: str, sid: str) -> Any:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, function_tool

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return weather(city)

    if session_by == "default_headers":  # on the client: every call of every agent using it
        sdk = sdk.with_options(default_headers={"X-Session-Id": sid})
        settings = ModelSettings()
    else:  # per agent, in its model settings
        settings = ModelSettings(extra_body={"session_id": sid})
    return Agent(name="Weather", instructions="Answer briefly.", tools=[get_weather],
                 model=OpenAIChatCompletionsModel(model=MODEL, openai_client=sdk),
                 model_settings=settings)


@pytest.mark.parametrize("session_by", ["extra_body", "default_headers"])
async def test_the_agents_sdk_runner_with_only_new_input(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, strict: StrictUpstream, sid: str,
    session_by: str,
) -> None:
    """Each run is given only the new question (the session holds the rest); within a run the
    Runner resends the run's items, [user, assistant(tool_calls), tool], on its second call."""
    from agents import Runner, set_tracing_disabled

    set_tracing_disabled(True)
    agent = agent_for(sdk, session_by, sid)
    start = len(strict.requests)
    first = await Runner.run(agent, PARIS)
    assert first.final_output == f"The weather: {weather('Paris')}."
    second = await Runner.run(agent, ROME)
    assert second.final_output == f"The weather: {weather('Rome')}."
    streamed = Runner.run_streamed(agent, OSLO)
    async for _ in streamed.stream_events():
        pass
    assert streamed.final_output == f"The weather: {weather('Oslo')}."
    await check_conversation(api, strict, sid, start, (PARIS, ROME, OSLO))
    second_call = strict.bodies_since(start)[1]["messages"]
    assert [m["role"] for m in second_call] == ["system", "user", "assistant", "tool"]


async def test_the_agents_sdk_runner_with_the_whole_conversation(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, strict: StrictUpstream, sid: str
) -> None:
    """The SDK's other pattern: the next run gets `result.to_input_list()` plus the question."""
    from agents import Runner, set_tracing_disabled

    set_tracing_disabled(True)
    agent = agent_for(sdk, "extra_body", sid)
    start = len(strict.requests)
    result = await Runner.run(agent, PARIS)
    for question in (ROME, OSLO):
        result = await Runner.run(agent, [*result.to_input_list(),
                                          {"role": "user", "content": question}])
    await check_conversation(api, strict, sid, start, (PARIS, ROME, OSLO))


# --- LangChain --------------------------------------------------------------------------------


@pytest.mark.parametrize("session_by", ["extra_body", "default_headers"])
async def test_langchain_chatopenai_with_bind_tools_and_a_manual_tool_loop(
    proxy: Serve, alice: User, api: httpx.AsyncClient, strict: StrictUpstream, sid: str,
    session_by: str,
) -> None:
    """LangChain's tool loop keeps the whole conversation and sends all of it every call."""
    from langchain_core.messages import BaseMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return weather(city)

    session: dict[str, Any] = (
        {"extra_body": {"session_id": sid}} if session_by == "extra_body"
        else {"default_headers": {"X-Session-Id": sid}})
    llm = ChatOpenAI(model=MODEL, base_url=proxy.url + "/v1", api_key=alice.key,
                     max_retries=0, **session)
    bound = llm.bind_tools([get_weather])
    start = len(strict.requests)
    conversation: list[BaseMessage] = []
    for question in (PARIS, ROME, OSLO):
        conversation.append(HumanMessage(question))
        reply = await bound.ainvoke(conversation)
        conversation.append(reply)
        while reply.tool_calls:
            for call in reply.tool_calls:
                result = get_weather.invoke(call["args"])
                conversation.append(ToolMessage(result, tool_call_id=call["id"]))
            reply = await bound.ainvoke(conversation)
            conversation.append(reply)
        assert reply.content == f"The weather: {weather(question.rstrip('?').split()[-1])}."
    await check_conversation(api, strict, sid, start, (PARIS, ROME, OSLO))


# --- openai-python's helpers -------------------------------------------------------------------

WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


async def test_the_stream_helper_in_a_tool_loop_that_resends_the_conversation(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, strict: StrictUpstream, sid: str
) -> None:
    """`client.chat.completions.stream(...)` as in openai-python's helpers guide, the returned
    message appended as it is (`messages.append(completion.choices[0].message)`)."""
    start = len(strict.requests)
    messages: list[Any] = []
    for question in (PARIS, ROME):
        messages.append({"role": "user", "content": question})
        while True:
            async with sdk.chat.completions.stream(
                model=MODEL, messages=messages, tools=[WEATHER_TOOL],
                extra_headers={"X-Session-Id": sid},
            ) as stream:
                async for _ in stream:
                    pass
                final = await stream.get_final_completion()
            message = final.choices[0].message
            messages.append(message)
            if not message.tool_calls:
                break
            for call in message.tool_calls:
                city = json.loads(call.function.arguments)["city"]
                messages.append({"role": "tool", "tool_call_id": call.id,
                                 "content": weather(city)})
    await check_conversation(api, strict, sid, start, (PARIS, ROME))


async def test_the_stream_helper_sending_only_new_messages(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, strict: StrictUpstream, sid: str
) -> None:
    """The other way with a session: send only what is new (the tool result alone)."""
    start = len(strict.requests)
    for question in (PARIS, ROME):
        new: list[Any] = [{"role": "user", "content": question}]
        while True:
            async with sdk.chat.completions.stream(
                model=MODEL, messages=new, tools=[WEATHER_TOOL], extra_body={"session_id": sid},
            ) as stream:
                final = await stream.get_final_completion()
            calls = final.choices[0].message.tool_calls or []
            if not calls:
                break
            new = [{"role": "tool", "tool_call_id": c.id,
                    "content": weather(json.loads(c.function.arguments)["city"])}
                   for c in calls]
    await check_conversation(api, strict, sid, start, (PARIS, ROME))


class Answer(BaseModel):
    answer: str


async def test_the_parse_helper(
    sdk: openai.AsyncOpenAI, api: httpx.AsyncClient, strict: StrictUpstream, sid: str
) -> None:
    start = len(strict.requests)
    messages: list[Any] = []
    for question in ("Say hi.", "Say bye."):
        messages.append({"role": "user", "content": question})
        parsed = await sdk.chat.completions.parse(
            model=MODEL, messages=messages, response_format=Answer,
            extra_body={"session_id": sid})
        message = parsed.choices[0].message
        assert message.parsed == Answer(answer=f"echo: {question}")
        messages.append({"role": "assistant", "content": message.content})
    assert strict.violations_since(start) == []
    bodies = strict.bodies_since(start)
    assert [conversation_problem(b["messages"]) for b in bodies] == [None, None]
    stored_messages = await stored(api, sid)
    assert [(m["role"], m["content"]) for m in stored_messages] == [
        ("user", "Say hi."), ("assistant", '{"answer": "echo: Say hi."}'),
        ("user", "Say bye."), ("assistant", '{"answer": "echo: Say bye."}')]
