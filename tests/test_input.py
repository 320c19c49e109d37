"""Hostile and unusual input (issue 5, items 1 and 2).

Every check happens before any database write or upstream call; text PostgreSQL cannot keep
(NUL, lone surrogates) travels and is stored exactly; body fields never steer the upstream call;
another user's session is the same 404 as one that does not exist, on every route.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from itertools import pairwise
from typing import Any

import asyncpg
import httpx
import pytest
import respx
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from proxy.config import Settings
from proxy.errors import PayloadTooLarge, SessionNotFound
from proxy.reading import MAX_JSON_DEPTH
from tests.conftest import UPSTREAM, UPSTREAM_KEY, User
from tests.fault_helpers import answering, app_client, completion
from tests.turns import new_session

CHAT = "/v1/chat/completions"


def error(message: str, code: str = "invalid_value", param: str | None = None,
          type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def stored_count(db: asyncpg.Connection, session_id: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM chat_messages WHERE session_id = $1", session_id)
    return count


@pytest.fixture
def route(upstream: respx.Router) -> respx.Route:
    return upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("fine")))


# --- 1. shape checks, before anything else happens ----------------------------------------

ROLES = "assistant, developer, function, system, tool, user"
BAD_BODIES: list[tuple[str, Any, dict[str, Any]]] = [
    ("no messages", {"model": "m"},
     error("messages must be an array", "missing_required_parameter", "messages")),
    ("messages not a list", {"model": "m", "messages": {"role": "user"}},
     error("messages must be an array", param="messages")),
    ("no message", {"model": "m", "messages": []},
     error("messages must hold at least one message", param="messages")),
    ("message not an object", {"model": "m", "messages": ["hi"]},
     error("Each message must be an object", param="messages[0]")),
    ("unknown role", {"model": "m", "messages": [{"role": "root", "content": "x"}]},
     error(f"messages[0].role must be one of {ROLES}", param="messages[0].role")),
    ("role not a string", {"model": "m", "messages": [{"role": ["user"], "content": "x"}]},
     error(f"messages[0].role must be one of {ROLES}", param="messages[0].role")),
    ("no role", {"model": "m", "messages": [{"content": "x"}]},
     error(f"messages[0].role must be one of {ROLES}", param="messages[0].role")),
    ("content an object",
     {"model": "m", "messages": [{"role": "user", "content": "a"},
                                 {"role": "user", "content": {"text": "x"}}]},
     error("messages[1].content must be a string, an array of content parts or null",
           param="messages[1].content")),
    ("content parts not objects", {"model": "m", "messages": [{"role": "user", "content": [1]}]},
     error("messages[0].content must be a string, an array of content parts or null",
           param="messages[0].content")),
    ("tool_calls an object",
     {"model": "m", "messages": [{"role": "assistant", "content": None, "tool_calls": {}}]},
     error("messages[0].tool_calls must be an array of objects",
           param="messages[0].tool_calls")),
    ("tool_call_id a number",
     {"model": "m", "messages": [{"role": "tool", "content": "x", "tool_call_id": 7}]},
     error("messages[0].tool_call_id must be a string", param="messages[0].tool_call_id")),
    ("body a list", [{"role": "user", "content": "x"}],
     error("The request body must be a JSON object")),
    ("history override out of range",
     {"model": "m", "max_history_messages": -1, "messages": [{"role": "user", "content": "x"}]},
     error("max_history_messages must be an integer between 0 and 1000",
           param="max_history_messages")),
]


@pytest.mark.parametrize(("case", "body", "expected"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_malformed_chat_body_is_400_before_any_write_or_upstream_call(
    client: Any, route: respx.Route, alice: User, db: asyncpg.Connection,
    case: str, body: Any, expected: dict[str, Any],
) -> None:
    sid = await new_session(client, alice)
    for stream in (False, True):
        sent = {**body, "session_id": sid, "stream": stream} if isinstance(body, dict) else body
        r = await client.post(CHAT, json=sent, headers=alice.headers)
        assert (r.status_code, r.json()) == (400, expected)
        r = await client.post(CHAT, json=sent, headers={**alice.headers, "x-session-id": sid})
        assert (r.status_code, r.json()) == (400, expected)
    assert route.call_count == 0
    assert await stored_count(db, sid) == 0


async def test_invalid_json_is_400(client: Any, route: respx.Route, alice: User) -> None:
    r = await client.post(CHAT, content=b'{"model": "m", "messages": [', headers=alice.headers)
    assert (r.status_code, r.json()) == (
        400, error("The request body is not valid JSON", "invalid_json"))
    assert route.call_count == 0


async def test_message_count_is_capped(
    settings: Settings, alice: User, db: asyncpg.Connection
) -> None:
    upstream, route = answering("ok")
    async with app_client(replace(settings, max_request_messages=3), upstream) as client:
        sid = await new_session(client, alice)
        three = [{"role": "user", "content": str(i)} for i in range(3)]
        r = await client.post(CHAT, json={"model": "m", "session_id": sid, "messages": three},
                              headers=alice.headers)
        assert r.status_code == 200
        r = await client.post(CHAT, json={"model": "m", "session_id": sid,
                                          "messages": [*three, three[0]]}, headers=alice.headers)
        assert (r.status_code, r.json()) == (
            400, error("At most 3 messages per request", param="messages"))
        r = await client.post(CHAT, json={"model": "m", "messages": [*three, three[0]]},
                              headers=alice.headers)
        assert r.status_code == 400
    assert route.call_count == 1
    assert await stored_count(db, sid) == 4


def nested(depth: int) -> Any:
    """A value whose JSON nesting depth, counted as parsing.py does, is `depth` (>= 1)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


async def test_json_nesting_depth_is_capped(
    client: Any, route: respx.Route, alice: User, db: asyncpg.Connection
) -> None:
    sid = await new_session(client, alice)
    base = {"model": "m", "session_id": sid, "messages": [{"role": "user", "content": "x"}]}
    # The body object is level 1, so a field may nest MAX_JSON_DEPTH - 1 levels.
    r = await client.post(CHAT, json={**base, "extra": nested(MAX_JSON_DEPTH - 1)},
                          headers=alice.headers)
    assert r.status_code == 200
    assert json.loads(route.calls.last.request.content)["extra"] == nested(MAX_JSON_DEPTH - 1)
    too_deep = error(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", "invalid_json")
    r = await client.post(CHAT, json={**base, "extra": nested(MAX_JSON_DEPTH)},
                          headers=alice.headers)
    assert (r.status_code, r.json()) == (400, too_deep)
    # Far deeper than any recursive parser's stack: still a plain 400, never a 500.
    hostile = b'{"model": "m", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    r = await client.post(CHAT, content=hostile, headers=alice.headers)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"
    for path in ("/v1/chat/sessions", f"/v1/chat/sessions/{sid}"):
        r = await client.request("POST" if path.endswith("sessions") else "PATCH", path,
                                 json={"metadata": {"a": nested(MAX_JSON_DEPTH)}},
                                 headers=alice.headers)
        assert (r.status_code, r.json()) == (400, too_deep)
    assert route.call_count == 1
    assert await stored_count(db, sid) == 2


# --- body size ----------------------------------------------------------------------------------


async def chunks(total: int) -> AsyncIterator[bytes]:
    yield b'{"model": "m", "messages": [{"role": "user", "content": "'
    for _ in range(total // 512):
        yield b"x" * 512
    yield b'"}]}'


async def test_body_over_the_limit_is_413_with_or_without_content_length(
    settings: Settings, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    # A real ASGI transport, so that a chunked body streams in without a Content-Length.
    async with app_client(replace(settings, max_body_bytes=2048), upstream) as small:
        await _body_over_the_limit(small, upstream, alice, db)


async def _body_over_the_limit(
    small: Any, upstream: respx.Router, alice: User, db: asyncpg.Connection
) -> None:
    chat_route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("no")))
    other = upstream.route().mock(return_value=httpx.Response(200, json={}))
    sid = await new_session(small, alice)
    too_large = PayloadTooLarge("Request body too large").body()
    body = {"model": "m", "session_id": sid,
            "messages": [{"role": "user", "content": "x" * 4096}]}
    cases = [
        (CHAT, {}), (CHAT, {"x-session-id": sid}),
        ("/v1/chat/sessions", {}), (f"/v1/chat/sessions/{sid}", {}), ("/v1/embeddings", {}),
    ]
    for path, extra in cases:
        method = "PATCH" if path.endswith(sid) else "POST"
        headers = {**alice.headers, **extra, "content-type": "application/json"}
        r = await small.request(method, path, content=json.dumps(body).encode(), headers=headers)
        assert (path, r.status_code, r.json()) == (path, 413, too_large)
        # Chunked: no Content-Length to refuse it by, so it is counted as it arrives.
        r = await small.request(method, path, content=chunks(4096), headers=headers)
        assert "content-length" not in r.request.headers
        assert (path, "chunked", r.status_code, r.json()) == (path, "chunked", 413, too_large)
    assert chat_route.call_count == 0
    assert await stored_count(db, sid) == 0
    # What does fit still passes.
    r = await small.post(CHAT, content=chunks(512), headers=alice.headers)
    assert r.status_code == 200
    assert chat_route.call_count == 1
    assert other.call_count == 0


# --- session ids that cannot be one -------------------------------------------------------------

MALFORMED_IDS = ["a\x00b", "sess_\ud800", "x" * 10_000, "sess_é", "", "sess_1; DROP TABLE x"]


@pytest.mark.parametrize("bad", MALFORMED_IDS, ids=["nul", "surrogate", "10kb", "non-ascii",
                                                     "empty", "sql"])
async def test_malformed_session_id_in_the_body_is_404(
    client: Any, route: respx.Route, alice: User, bad: str
) -> None:
    expected = SessionNotFound(bad).body()
    for stream in (False, True):
        body = {"model": "m", "session_id": bad, "stream": stream,
                "messages": [{"role": "user", "content": "x"}]}
        r = await client.post(CHAT, content=json.dumps(body).encode(), headers=alice.headers)
        assert (r.status_code, r.json()) == (404, expected)
    assert route.call_count == 0


@pytest.mark.parametrize("bad", [b"a\x00b", b"x" * 10_000, "sess_\xe9".encode("latin-1"), b""],
                         ids=["nul", "10kb", "latin1", "empty"])
async def test_malformed_session_id_in_the_header_is_404(
    client: Any, route: respx.Route, alice: User, bad: bytes
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    headers = [(b"authorization", alice.headers["Authorization"].encode()),
               (b"x-session-id", bad)]
    r = await client.post(CHAT, json=body, headers=headers)
    assert (r.status_code, r.json()) == (404, SessionNotFound(bad.decode("latin-1")).body())
    assert route.call_count == 0


@pytest.mark.parametrize("bad", [123, ["sess_x"], {"id": "sess_x"}, True])
async def test_session_id_that_is_not_a_string_is_400(
    client: Any, route: respx.Route, alice: User, bad: Any
) -> None:
    r = await client.post(CHAT, json={"model": "m", "session_id": bad,
                                      "messages": [{"role": "user", "content": "x"}]},
                          headers=alice.headers)
    assert (r.status_code, r.json()) == (
        400, error("session_id must be a string", param="session_id"))
    assert route.call_count == 0


def session_routes(app: Any) -> list[tuple[str, str]]:
    """(method, path template) of every route that takes a `{session_id}`, from the app itself."""
    found = []
    for r in app.routes:
        if "session_id" in getattr(r, "path_parameters", ()):
            found += [(m, r.path) for m in sorted(r.methods) if m not in ("OPTIONS", "HEAD")]
    return found


def fill(template: str, session_id: str) -> str:
    return re.sub(r"\{session_id(:\w+)?\}", lambda _: session_id, template)


@pytest.mark.parametrize("bad", ["a%00b", "%ED%A0%80", "x" * 5000, "%FF"],
                         ids=["nul", "surrogate", "5kb", "not-utf8"])
async def test_malformed_session_id_in_a_path_is_404_on_every_route(
    client: Any, alice: User, bad: str
) -> None:
    routes = session_routes(client.app)
    assert len(routes) >= 14
    for method, template in routes:
        r = await client.request(method, fill(template, bad), json={}, headers=alice.headers)
        assert (method, template, r.status_code) == (method, template, 404), r.text
        assert r.json()["error"]["code"] in ("session_not_found", "not_found")


@pytest.mark.parametrize(("bad", "status", "expected"), [
    ("a\x00b", 404, SessionNotFound("a\x00b", param="source_session_id").body()),
    ("sess_\ud800", 400, error("Invalid value for source_session_id: Input should be a valid "
                               "string, unable to parse raw data as a unicode string",
                               param="source_session_id")),
], ids=["nul", "surrogate"])
async def test_malformed_merge_source_is_refused_before_any_query(
    client: Any, alice: User, bad: str, status: int, expected: dict[str, Any]
) -> None:
    sid = await new_session(client, alice)
    r = await client.post(f"/v1/chat/sessions/{sid}/merge", headers=alice.headers,
                          content=encode({"source_session_id": bad}))
    assert (r.status_code, r.json()) == (status, expected)


# --- text PostgreSQL cannot keep, round trip ------------------------------------------------------

EDGES = ["\x00", "\ud800", "\udbff", "\udc00", "\udfff", "\U0001f600", "\U0010ffff", "\u2028",
         "\ufeff", "\\", '"', "\x01", "\x7f", "é"]
CHARS = st.one_of(st.characters(), st.sampled_from(EDGES), st.integers(0xD800, 0xDFFF).map(chr))


def json_representable(text: str) -> bool:
    """A lone high surrogate right before a lone low one is, in JSON, one astral character."""
    return not any(
        "\ud800" <= a <= "\udbff" and "\udc00" <= b <= "\udfff" for a, b in pairwise(text)
    )


TEXTS = st.one_of(
    st.text(CHARS, max_size=40),
    st.text(CHARS, min_size=1, max_size=8).map(lambda t: t * 3_000),  # up to ~150 KB of JSON
).filter(json_representable)
ROUND_TRIP = hsettings(max_examples=15, deadline=None,
                       suppress_health_check=[HealthCheck.function_scoped_fixture,
                                              HealthCheck.too_slow, HealthCheck.data_too_large])


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()  # lone surrogates as \\uXXXX escapes


def sse(*deltas: dict[str, Any]) -> bytes:
    events = [encode({"choices": [{"index": 0, "delta": d}]}) for d in deltas]
    return b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n"


async def messages_of(client: Any, user: User, sid: str) -> list[Any]:
    r = await client.get(f"/v1/chat/sessions/{sid}/messages", headers=user.headers)
    assert r.status_code == 200
    return [(m["role"], m["content"]) for m in json.loads(r.content)["data"]]


async def exported(client: Any, user: User, sid: str) -> list[Any] | None:
    r = await client.get(f"/v1/chat/sessions/{sid}/export", headers=user.headers)
    if r.status_code == 404 and r.json()["error"]["code"] == "not_found":
        return None  # no export route in this build
    assert r.status_code == 200, r.text
    return [(m["role"], m["content"]) for m in json.loads(r.content)["messages"]]


@ROUND_TRIP
@given(text=TEXTS)
async def test_any_text_round_trips_exactly_through_a_turn(
    client: Any, upstream: respx.Router, alice: User, text: str
) -> None:
    reply = "re:" + text
    route = upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, content=encode(completion(reply)), headers={"content-type": "application/json"}))
    sid = await new_session(client, alice)
    sent = {"role": "user", "content": text, "name": "n" + text[:3]}
    r = await client.post(CHAT, content=encode({"model": "gpt-4o", "session_id": sid,
                                                "messages": [sent]}), headers=alice.headers)
    assert r.status_code == 200, r.text
    assert json.loads(r.content)["choices"][0]["message"]["content"] == reply
    assert json.loads(route.calls.last.request.content)["messages"] == [sent]
    assert await messages_of(client, alice, sid) == [("user", text), ("assistant", reply)]
    # The stored turn goes upstream again as history (what fits the budget), still exact.
    r = await client.post(CHAT, content=encode({
        "model": "gpt-4o", "session_id": sid, "messages": [{"role": "user", "content": "2"}]}),
        headers=alice.headers)
    injected = int(r.headers["x-history-messages"])
    history = json.loads(route.calls.last.request.content)["messages"]
    assert history[:-1] == [sent, {"role": "assistant", "content": reply}][2 - injected:]
    assert await exported(client, alice, sid) in (None, [
        ("user", text), ("assistant", reply), ("user", "2"), ("assistant", reply)])


@ROUND_TRIP
@given(text=TEXTS, cut=st.integers(0, 40))
async def test_any_text_round_trips_exactly_through_a_streamed_turn(
    client: Any, upstream: respx.Router, alice: User, text: str, cut: int
) -> None:
    body = sse({"role": "assistant", "content": ""}, {"content": text[:cut]},
               {"content": text[cut:]}, {})
    route = upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, content=body, headers={"content-type": "text/event-stream"}))
    sid = await new_session(client, alice)
    r = await client.post(CHAT, content=encode({
        "model": "gpt-4o", "session_id": sid, "stream": True,
        "messages": [{"role": "user", "content": text}]}), headers=alice.headers)
    assert r.status_code == 200
    assert r.content == body  # byte for byte
    assert json.loads(route.calls.last.request.content)["messages"] == [
        {"role": "user", "content": text}]
    assert await messages_of(client, alice, sid) == [("user", text), ("assistant", text)]
    assert await exported(client, alice, sid) in (None, [("user", text), ("assistant", text)])


async def test_unstorable_text_in_session_fields_round_trips(client: Any, alice: User) -> None:
    odd = "a\x00b\ud800c\U0001f600"
    r = await client.post("/v1/chat/sessions", content=encode({
        "session_name": odd, "system_prompt": odd, "metadata": {"k": odd}}),
        headers=alice.headers)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = await client.get(f"/v1/chat/sessions/{sid}", headers=alice.headers)
    got = json.loads(r.content)
    assert (got["session_name"], got["system_prompt"], got["metadata"]) == (odd, odd, {"k": odd})


# --- body fields never steer the upstream call ---------------------------------------------------

STEERING = {
    "api_base": "http://attacker.test/v1", "base_url": "http://attacker.test/v1",
    "api_key": "sk-attacker", "extra_headers": {"authorization": "Bearer sk-attacker",
                                                "x-evil": "1"},
    "headers": {"Authorization": "Bearer sk-attacker", "Host": "attacker.test"},
    "url": "http://attacker.test/", "custom_llm_provider": "attacker",
}


@pytest.mark.parametrize("with_session", [False, True])
@pytest.mark.parametrize("stream", [False, True])
async def test_body_fields_never_change_where_or_how_the_upstream_is_called(
    client: Any, route: respx.Route, alice: User, with_session: bool, stream: bool
) -> None:
    body: dict[str, Any] = {"model": "gpt-4o", "stream": stream, **STEERING,
                            "messages": [{"role": "user", "content": "x"}]}
    if with_session:
        body["session_id"] = await new_session(client, alice)
    headers = {**alice.headers, "x-forwarded-host": "attacker.test", "host": "attacker.test"}
    r = await client.post(CHAT, json=body, headers=headers)
    assert r.status_code == 200
    assert route.call_count == 1
    call = route.calls.last.request
    assert str(call.url) == UPSTREAM + "/chat/completions"
    assert call.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert call.headers["host"] == "upstream.test"
    assert "x-evil" not in call.headers and "x-forwarded-host" not in call.headers
    forwarded = json.loads(call.content)
    for name, value in STEERING.items():
        assert forwarded[name] == value  # at most a plain body field, as the client sent it


# --- 2. another user's session is a session that does not exist -----------------------------------

UNKNOWN = "sess_" + "Z" * 24


def same_404(foreign: httpx.Response, unknown: httpx.Response, foreign_id: str) -> None:
    assert foreign.status_code == unknown.status_code == 404, (foreign.text, unknown.text)
    assert foreign.content == unknown.content.replace(UNKNOWN.encode(), foreign_id.encode())


async def test_every_session_route_answers_a_foreign_id_like_an_unknown_one(
    client: Any, upstream: respx.Router, alice: User, bob: User, db: asyncpg.Connection
) -> None:
    route = upstream.route().mock(return_value=httpx.Response(200, json=completion("a")))
    sid = await new_session(client, alice)
    await client.post(CHAT, json={"model": "m", "session_id": sid,
                                  "messages": [{"role": "user", "content": "alice's secret"}]},
                      headers=alice.headers)
    before = await messages_of(client, alice, sid)
    bobs = await new_session(client, bob)
    routes = session_routes(client.app)
    assert len(routes) >= 14, routes
    for method, template in routes:
        body: dict[str, Any] = {}
        if template.endswith("/merge"):
            body = {"source_session_id": bobs}
        foreign = await client.request(method, fill(template, sid), json=body, headers=bob.headers)
        unknown = await client.request(method, fill(template, UNKNOWN), json=body,
                                       headers=bob.headers)
        same_404(foreign, unknown, sid)
        if template.endswith("/merge"):  # alice's session as the source of bob's merge
            foreign = await client.request(method, fill(template, bobs),
                                           json={"source_session_id": sid}, headers=bob.headers)
            unknown = await client.request(method, fill(template, bobs),
                                           json={"source_session_id": UNKNOWN},
                                           headers=bob.headers)
            same_404(foreign, unknown, sid)
    for include in ("false", "true"):
        r = await client.get(f"/v1/chat/sessions?include_inactive={include}&limit=100",
                             headers=bob.headers)
        assert sid not in r.text
    # Nothing of alice's changed, and bob's requests never reached the upstream.
    r = await client.get(f"/v1/chat/sessions/{sid}", headers=alice.headers)
    assert r.status_code == 200
    assert r.json()["is_active"] is True
    assert await messages_of(client, alice, sid) == before
    assert route.call_count == 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("where", ["body", "header"])
async def test_chat_with_a_foreign_session_is_the_unknown_404_and_nothing_goes_upstream(
    client: Any, route: respx.Route, alice: User, bob: User, db: asyncpg.Connection,
    stream: bool, where: str,
) -> None:
    sid = await new_session(client, alice)

    async def ask(session_id: str) -> httpx.Response:
        body: dict[str, Any] = {"model": "m", "stream": stream,
                                "messages": [{"role": "user", "content": "x"}]}
        headers = dict(bob.headers)
        if where == "body":
            body["session_id"] = session_id
        else:
            headers["x-session-id"] = session_id
        return await client.post(CHAT, json=body, headers=headers)

    same_404(await ask(sid), await ask(UNKNOWN), sid)
    assert route.call_count == 0
    assert await stored_count(db, sid) == 0
