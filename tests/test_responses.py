"""`POST /v1/responses` over chat completions (contract §10), with a respx upstream: what the
upstream is sent, the `response` object answered, stored and retrieved, chains and branches."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import respx
from openai.types.responses import Response as SdkResponse

from tests.conftest import User
from tests.turns import Client, answers, completion, sent


def create(client: Client, caller: User, /, **body: Any) -> Any:
    body.setdefault("model", "gpt-4o")
    return client.post("/v1/responses", json=body, headers=caller.headers)


def call(name: str, arguments: str, call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


async def test_a_response_is_one_chat_completion_and_answers_openais_object(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(
        side_effect=answers(completion("Hello there")))
    r = await create(client, alice, input="Hi", instructions="Be brief.", temperature=0.2,
                     max_output_tokens=50, metadata={"k": "v"}, user="u-1")
    assert r.status_code == 200, r.text
    assert sent(route) == {
        "model": "gpt-4o", "temperature": 0.2, "user": "u-1", "max_completion_tokens": 50,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"}],
    }
    body = r.json()
    parsed = SdkResponse.model_validate(body)
    assert parsed.output_text == "Hello there"
    assert body["id"].startswith("resp_") and body["status"] == "completed"
    stem = body["id"].removeprefix("resp_")
    assert body["output"] == [{
        "id": f"msg_{stem}", "type": "message", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": "Hello there", "annotations": []}]}]
    assert body["usage"] == {
        "input_tokens": 9, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 4, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 13}
    assert (body["instructions"], body["metadata"], body["temperature"],
            body["max_output_tokens"], body["previous_response_id"], body["conversation"]) == (
        "Be brief.", {"k": "v"}, 0.2, 50, None, None)

    got = await client.get(f"/v1/responses/{body['id']}", headers=alice.headers)
    assert got.status_code == 200 and got.json() == body


async def test_a_chain_carries_history_and_a_branch_leaves_later_turns_out(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(
        completion("one"), completion("two"), completion("branch")))
    first = (await create(client, alice, input="a", instructions="first only")).json()
    second = (await create(client, alice, input="b", previous_response_id=first["id"])).json()
    assert second["previous_response_id"] == first["id"]
    assert sent(route)["messages"] == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "b"}]
    # branching from the first again: the second turn is not in this history
    await create(client, alice, input="c", previous_response_id=first["id"])
    assert [m["content"] for m in sent(route)["messages"]] == ["a", "one", "c"]
    assert second["status"] == "completed"


async def test_function_tools_and_their_results_go_upstream_in_chat_form(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    route = upstream.post("/chat/completions").mock(side_effect=answers(
        completion(None, tool_calls=[call("get_weather", '{"city":"Paris"}')]),
        completion("Sunny in Paris")))
    tool = {"type": "function", "name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            "strict": True}
    first = (await create(client, alice, input="Weather in Paris?", tools=[tool],
                          tool_choice="auto", parallel_tool_calls=False)).json()
    assert sent(route)["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather", "parameters": tool["parameters"],
        "strict": True}}]
    assert (sent(route)["tool_choice"], sent(route)["parallel_tool_calls"]) == ("auto", False)
    stem = first["id"].removeprefix("resp_")
    assert first["output"] == [{"id": f"fc_{stem}_0", "type": "function_call",
                                "status": "completed", "call_id": "call_1",
                                "name": "get_weather", "arguments": '{"city":"Paris"}'}]
    SdkResponse.model_validate(first)
    second = await create(client, alice, previous_response_id=first["id"], tools=[tool],
                          input=[{"type": "function_call_output", "call_id": "call_1",
                                  "output": "sunny"}])
    assert second.status_code == 200, second.text
    assert sent(route)["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [call("get_weather", '{"city":"Paris"}')]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


async def test_store_false_keeps_nothing(
    client: Client, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    upstream.post("/chat/completions").mock(side_effect=answers(completion("x")))
    before = await db.fetchval("SELECT count(*) FROM responses")
    r = await create(client, alice, input="secret", store=False)
    assert r.status_code == 200 and r.json()["store"] is False
    assert await db.fetchval("SELECT count(*) FROM responses") == before
    got = await client.get(f"/v1/responses/{r.json()['id']}", headers=alice.headers)
    assert got.status_code == 404


async def test_an_upstream_error_passes_through(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    error = {"error": {"message": "slow down", "type": "rate_limit", "code": "rate_limited"}}
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        429, json=error, headers={"retry-after": "3"}))
    r = await create(client, alice, input="hi")
    assert (r.status_code, r.json(), r.headers["retry-after"]) == (429, error, "3")


async def test_the_route_litestar_keeps_answers_as_the_fast_one(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    upstream.post("/chat/completions").mock(side_effect=answers(completion("a"), completion("b")))
    fast = await client.post("/v1/responses", json={"model": "m", "input": "x"},
                             headers=alice.headers)
    routed = await client.post("/v1/responses/", json={"model": "m", "input": "x"},
                               headers=alice.headers)
    assert (fast.status_code, routed.status_code) == (200, 200)
    assert [r.json()["output"][0]["content"][0]["text"] for r in (fast, routed)] == ["a", "b"]
    bad = [await client.post(path, json={"model": "m"}, headers=alice.headers)
           for path in ("/v1/responses", "/v1/responses/")]
    assert bad[0].json() == bad[1].json() == {"error": {
        "message": "input is required", "type": "invalid_request_error", "param": "input",
        "code": "missing_required_parameter"}}


async def test_without_the_upstreams_usage_the_tokens_are_counted_the_same_way(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    upstream.post("/chat/completions").mock(side_effect=answers(
        completion("four words of reply", usage=None), completion("four words of reply",
                                                                  usage=None)))
    stored = (await create(client, alice, input="count me in", instructions="sys")).json()
    unstored = (await create(client, alice, input="count me in", instructions="sys",
                             store=False)).json()
    usage = stored["usage"]
    # the reply as history counts it (its four words and its role), less the message overhead
    assert usage["input_tokens"] > 5 and usage["output_tokens"] == 5
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert unstored["usage"] == usage  # counted by the write, or by the door: alike
    got = await client.get(f"/v1/responses/{stored['id']}", headers=alice.headers)
    assert got.json()["usage"] == usage


async def test_a_chain_too_long_for_the_model_is_sent_again_with_less_of_it(
    client: Client, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    too_long = httpx.Response(400, json={"error": {
        "message": "the input length exceeds the context length", "type": "api_error"}})
    route = upstream.post("/chat/completions").mock(side_effect=[
        *answers(completion("one"), completion("two")), too_long,
        httpx.Response(200, json=completion("three"))])
    first = (await create(client, alice, input="a")).json()
    second = (await create(client, alice, input="b", previous_response_id=first["id"])).json()
    r = await create(client, alice, input="c", previous_response_id=second["id"])
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"][0]["text"] == "three"
    assert route.call_count == 4  # the refused turn, and once more (contract §11)
    refused, retried = sent(route, 2)["messages"], sent(route, 3)["messages"]
    assert [m["content"] for m in refused] == ["a", "one", "b", "two", "c"]
    assert len(retried) < len(refused) and retried[-1] == {"role": "user", "content": "c"}
    assert await db.fetchval("SELECT count(*) FROM responses WHERE id = $1", r.json()["id"]) == 1
