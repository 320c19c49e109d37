"""Several upstreams (contract §2): a request's `model` picks the upstream, each gets its own
key (a local one none), and `GET /v1/models` merges every upstream's list.

One respx router without a base URL stands for all upstreams and routes by host:
`local.test` (no key; llama*, qwen*), `cloud.test` (its own key; mistral*) and the default
`upstream.test` (the default key; everything else).
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx
from litestar.testing import AsyncTestClient

from proxy.app import create_app
from proxy.config import Settings, Upstream
from proxy.upstream import make_client
from tests.conftest import UPSTREAM, UPSTREAM_KEY, User, configured
from tests.turns import Client, a, completion, new_session, sent, stored, u

LOCAL = "http://local.test/v1"
CLOUD = "http://cloud.test/v1"
CLOUD_KEY = "sk-cloud-secret-9876543210"
SSE = {"content-type": "text/event-stream"}


@pytest.fixture
def router() -> respx.Router:
    return respx.Router(assert_all_called=False)


@pytest.fixture
def routed(settings: Settings) -> Settings:
    return configured(settings, upstreams=(
        Upstream("local", LOCAL, None, ("llama*", "qwen*")),
        Upstream("cloud", CLOUD, CLOUD_KEY, ("mistral*",)),
    ))


@pytest.fixture
async def proxy(routed: Settings, router: respx.Router) -> AsyncIterator[Client]:
    http = make_client(routed, transport=httpx.MockTransport(router.async_handler))
    app = create_app(routed, http_client=http)
    async with AsyncTestClient(app=app, base_url="http://proxy.test") as test_client:
        yield test_client
    await http.aclose()


def chat_routes(router: respx.Router, answer: Any = None) -> dict[str, respx.Route]:
    answer = answer if answer is not None else httpx.Response(200, json=completion("hi"))
    return {
        name: router.post(f"{base}/chat/completions").mock(return_value=answer)
        for name, base in (("local", LOCAL), ("cloud", CLOUD), ("default", UPSTREAM))
    }


def called(routes: dict[str, respx.Route]) -> dict[str, int]:
    return {name: route.call_count for name, route in routes.items()}


def authorization(route: respx.Route, index: int = -1) -> str | None:
    value: str | None = route.calls[index].request.headers.get("authorization")
    return value


# --- chat completions -------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "where", "key"), [
    ("llama3.1:8b", "local", None),
    ("qwen2.5", "local", None),
    ("mistral-large", "cloud", f"Bearer {CLOUD_KEY}"),
    ("gpt-4o", "default", f"Bearer {UPSTREAM_KEY}"),
    ("not-llama", "default", f"Bearer {UPSTREAM_KEY}"),  # patterns match the whole name
])
async def test_a_session_turn_goes_to_the_upstream_its_model_picks_with_that_upstreams_key(
    proxy: Client, router: respx.Router, alice: User, model: str, where: str, key: str | None
) -> None:
    routes = chat_routes(router)
    sid = await new_session(proxy, alice)
    r = await proxy.post("/v1/chat/completions", headers=alice.headers, json={
        "model": model, "session_id": sid, "messages": [u("one")]})
    assert r.status_code == 200, r.text
    assert r.json() == completion("hi")
    assert called(routes) == {name: int(name == where) for name in routes}
    assert authorization(routes[where]) == key
    assert sent(routes[where]) == {"model": model, "messages": [u("one")]}
    assert [(m["role"], m["content"]) for m in await stored(proxy, alice, sid)] == [
        ("user", "one"), ("assistant", "hi")]


async def test_a_streamed_session_turn_is_routed_by_model_and_stored(
    proxy: Client, router: respx.Router, alice: User
) -> None:
    events = [
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    routes = chat_routes(router, httpx.Response(200, headers=SSE, content=b"".join(events)))
    sid = await new_session(proxy, alice)
    first = await proxy.post("/v1/chat/completions", headers=alice.headers, json={
        "model": "qwen2.5", "session_id": sid, "stream": True, "messages": [u("one")]})
    assert first.status_code == 200, first.text
    assert first.content == b"".join(events)
    second = await proxy.post("/v1/chat/completions", headers=alice.headers, json={
        "model": "qwen2.5", "session_id": sid, "stream": True, "messages": [u("two")]})
    assert second.status_code == 200
    assert called(routes) == {"local": 2, "cloud": 0, "default": 0}
    assert authorization(routes["local"]) is None
    assert sent(routes["local"])["messages"] == [u("one"), a("Hello"), u("two")]
    assert [(m["role"], m["content"]) for m in await stored(proxy, alice, sid)] == [
        ("user", "one"), ("assistant", "Hello"), ("user", "two"), ("assistant", "Hello")]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_chat_without_a_session_is_routed_by_model_too(
    proxy: Client, router: respx.Router, alice: User, stream: bool
) -> None:
    routes = chat_routes(router)
    body = {"model": "llama3", "messages": [u("hi")], "stream": stream}
    r = await proxy.post("/v1/chat/completions", headers=alice.headers, json=body)
    assert r.status_code == 200
    assert called(routes) == {"local": 1, "cloud": 0, "default": 0}
    assert authorization(routes["local"]) is None
    assert sent(routes["local"]) == body
    r = await proxy.post("/v1/chat/completions", headers=alice.headers,
                         json={**body, "model": "gpt-4o-mini"})
    assert r.status_code == 200
    assert called(routes) == {"local": 1, "cloud": 0, "default": 1}
    assert authorization(routes["default"]) == f"Bearer {UPSTREAM_KEY}"


async def test_an_upstream_error_from_the_routed_upstream_is_passed_through(
    proxy: Client, router: respx.Router, alice: User
) -> None:
    error = {"error": {"message": "model not loaded", "type": "not_found", "code": None}}
    routes = chat_routes(router, httpx.Response(404, json=error))
    sid = await new_session(proxy, alice)
    r = await proxy.post("/v1/chat/completions", headers=alice.headers, json={
        "model": "llama3", "session_id": sid, "messages": [u("one")]})
    assert (r.status_code, r.json()) == (404, error)
    assert called(routes) == {"local": 1, "cloud": 0, "default": 0}
    assert await stored(proxy, alice, sid) == []


# --- other routes -------------------------------------------------------------------------------


async def test_json_routes_with_a_model_are_routed_and_forwarded_byte_for_byte(
    proxy: Client, router: respx.Router, alice: User
) -> None:
    local = router.post(f"{LOCAL}/embeddings").mock(return_value=httpx.Response(200, json={}))
    default = router.post(f"{UPSTREAM}/embeddings").mock(
        return_value=httpx.Response(200, json={}))
    raw = b'{"input": "caf\\u00e9 \\ud800",  "model": "llama-embed"}'
    r = await proxy.post("/v1/embeddings", headers={**alice.headers,
                         "content-type": "application/json"}, content=raw)
    assert r.status_code == 200
    assert (local.call_count, default.call_count) == (1, 0)
    assert local.calls[0].request.content == raw
    assert authorization(local) is None
    for body in (b'{"model": "text-embedding-3-small", "input": "x"}', b"not json", b"[1]"):
        r = await proxy.post("/v1/embeddings", headers={**alice.headers,
                             "content-type": "application/json"}, content=body)
        assert r.status_code == 200
        assert default.calls[-1].request.content == body
        assert authorization(default) == f"Bearer {UPSTREAM_KEY}"
    assert (local.call_count, default.call_count) == (1, 3)


async def test_a_model_path_goes_to_the_upstream_serving_that_model(
    proxy: Client, router: respx.Router, alice: User
) -> None:
    local = router.get(f"{LOCAL}/models/llama3:8b").mock(
        return_value=httpx.Response(200, json={"id": "llama3:8b", "object": "model"}))
    default = router.delete(f"{UPSTREAM}/models/ft:gpt-4o:me").mock(
        return_value=httpx.Response(200, json={"deleted": True}))
    r = await proxy.get("/v1/models/llama3:8b", headers=alice.headers)
    assert (r.status_code, r.json()) == (200, {"id": "llama3:8b", "object": "model"})
    r = await proxy.delete("/v1/models/ft:gpt-4o:me", headers=alice.headers)
    assert (r.status_code, r.json()) == (200, {"deleted": True})
    assert (local.call_count, default.call_count) == (1, 1)
    assert authorization(default) == f"Bearer {UPSTREAM_KEY}"


# --- GET /v1/models ---------------------------------------------------------------------------


def model(model_id: str, owner: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner}


def listing(*models: dict[str, Any]) -> httpx.Response:
    return httpx.Response(200, json={"object": "list", "data": list(models)})


def model_routes(router: respx.Router, local: Any, cloud: Any, default: Any
                 ) -> dict[str, respx.Route]:
    return {
        "local": router.get(f"{LOCAL}/models").mock(side_effect=[local]),
        "cloud": router.get(f"{CLOUD}/models").mock(side_effect=[cloud]),
        "default": router.get(f"{UPSTREAM}/models").mock(side_effect=[default]),
    }


async def test_models_merges_every_upstreams_list_each_asked_with_its_own_key(
    proxy: Client, router: respx.Router, alice: User
) -> None:
    routes = model_routes(
        router,
        listing(model("llama3", "ollama"), model("qwen2.5", "ollama")),
        listing(model("mistral-large", "mistral"), model("llama3", "mistral")),
        listing(model("gpt-4o", "openai")),
    )
    r = await proxy.get("/v1/models?limit=5", headers=alice.headers)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"object": "list", "data": [
        model("llama3", "ollama"), model("qwen2.5", "ollama"), model("mistral-large", "mistral"),
        model("gpt-4o", "openai"),
    ]}
    assert called(routes) == {"local": 1, "cloud": 1, "default": 1}
    assert authorization(routes["local"]) is None
    assert authorization(routes["cloud"]) == f"Bearer {CLOUD_KEY}"
    assert authorization(routes["default"]) == f"Bearer {UPSTREAM_KEY}"
    for route in routes.values():
        assert route.calls[0].request.url.query == b"limit=5"
        assert alice.key not in str(route.calls[0].request.headers)


async def test_an_upstream_that_fails_is_skipped_and_logged_without_its_key(
    proxy: Client, router: respx.Router, alice: User, captured: io.StringIO
) -> None:
    model_routes(
        router,
        httpx.ConnectError("refused"),
        httpx.Response(401, json={"error": {"message": "bad key"}}),
        listing(model("gpt-4o", "openai")),
    )
    r = await proxy.get("/v1/models", headers=alice.headers)
    assert (r.status_code, r.json()) == (200, {"object": "list",
                                              "data": [model("gpt-4o", "openai")]})
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    skipped = [(line["level"], line["msg"]) for line in lines
               if line["logger"] == "chatproxy.models"]
    assert skipped == [
        ("warning", "model list from upstream local skipped: upstream_error"),
        ("warning", "model list from upstream cloud skipped: HTTP 401"),
    ]
    access = [line for line in lines if line["logger"] == "chatproxy.access"][-1]
    assert (access["upstream"], access["upstream_status"]) == ("local,cloud,default", 200)
    for secret in (CLOUD_KEY, UPSTREAM_KEY, alice.key):
        assert secret not in captured.getvalue()


async def test_when_every_upstream_fails_the_default_upstreams_error_is_passed_through(
    proxy: Client, router: respx.Router, alice: User
) -> None:
    error = {"error": {"message": "slow down", "type": "rate_limit", "code": None}}
    model_routes(
        router,
        httpx.Response(500, json={"error": {"message": "local broke"}}),
        httpx.ReadTimeout("slow"),
        httpx.Response(429, json=error, headers={"Retry-After": "7"}),
    )
    r = await proxy.get("/v1/models", headers=alice.headers)
    assert (r.status_code, r.json(), r.headers["retry-after"]) == (429, error, "7")


async def test_when_every_upstream_fails_without_an_answer_the_proxy_answers_502(
    proxy: Client, router: respx.Router, alice: User
) -> None:
    model_routes(
        router,
        httpx.Response(200, content=b"<html>"),
        httpx.Response(503, text="down"),
        httpx.Response(200, json={"object": "list"}),  # no data: not a list of models
    )
    r = await proxy.get("/v1/models", headers=alice.headers)
    assert r.status_code == 502
    assert r.json() == {"error": {
        "message": "The upstream answered with a body that is not a list of models",
        "type": "server_error", "param": None, "code": "upstream_error"}}


async def test_with_the_default_upstream_alone_models_is_a_plain_relay(
    client: Client, upstream: respx.Router, alice: User
) -> None:
    raw = b'{"object":"list","data":[{"id":"gpt-4o"}],"extra":1}'
    route = upstream.get("/models").mock(return_value=httpx.Response(
        200, content=raw, headers={"content-type": "application/json", "x-upstream": "yes"}))
    r = await client.get("/v1/models", headers=alice.headers)
    assert (r.status_code, r.content, r.headers["x-upstream"]) == (200, raw, "yes")
    assert authorization(route) == f"Bearer {UPSTREAM_KEY}"
