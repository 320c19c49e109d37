"""What a hostile client sends that is not about the turn (issue 13, items 9, 10, 13 and 15).

Non-finite numbers in a JSON body, bytes beyond ASCII in a header, hop-by-hop headers named by
`Connection`, and control characters in a path parameter: each is a 4xx or travels exactly, never
a 500, and nothing changes on the way.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx
import pytest
import respx

from proxy.config import Settings
from tests.conftest import ADMIN_KEY, UPSTREAM_KEY, User
from tests.fault_helpers import LiveClient, app_client, asgi_exchange
from tests.turns import completion, new_session

CHAT = "/v1/chat/completions"
INVALID_JSON = {"error": {"message": "The request body is not valid JSON",
                          "type": "invalid_request_error", "param": None, "code": "invalid_json"}}


@pytest.fixture
def route(upstream: respx.Router) -> respx.Route:
    return upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("fine")))


# --- 10. NaN, Infinity and numbers beyond a float ---------------------------------------------

# Each is what Python's json module takes and msgspec refuses; the request body holds it raw.
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400 + ".5"]
NON_FINITE_IDS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "long-mantissa"]


def chat_body(number: str, session_id: str | None) -> bytes:
    sid = f'"session_id": "{session_id}", ' if session_id else ""
    return ('{"model": "gpt-4o", ' + sid + '"temperature": ' + number
            + ', "messages": [{"role": "user", "content": "hi"}]}').encode()


@pytest.mark.parametrize("number", NON_FINITE, ids=NON_FINITE_IDS)
async def test_non_finite_numbers_are_refused_on_the_chat_route(
    client: Any, route: respx.Route, alice: User, db: asyncpg.Connection, number: str
) -> None:
    sid = await new_session(client, alice)
    for session_id in (sid, None):
        r = await client.post(CHAT, content=chat_body(number, session_id), headers=alice.headers)
        assert (r.status_code, r.json()) == (400, INVALID_JSON)
    # Also where only the stdlib can decode the body (a lone surrogate beside the number).
    body = chat_body(number, sid).replace(b'"hi"', b'"\\ud800"')
    r = await client.post(CHAT, content=body, headers=alice.headers)
    assert (r.status_code, r.json()) == (400, INVALID_JSON)
    assert route.call_count == 0
    assert await db.fetchval("SELECT count(*) FROM chat_messages WHERE session_id = $1", sid) == 0


@pytest.mark.parametrize("number", NON_FINITE, ids=NON_FINITE_IDS)
async def test_non_finite_numbers_are_refused_on_every_json_route(
    client: Any, alice: User, db: asyncpg.Connection, number: str
) -> None:
    sid = await new_session(client, alice, session_name="before")
    other = await new_session(client, alice)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    document = ('{"format": "chatproxy.session.v1", "session": {"session_name": "x"}, '
                '"messages": [{"role": "user", "content": "hi", "tokens": ' + number + '}]}')
    cases = [
        ("POST", "/v1/chat/sessions", '{"max_history_messages": ' + number + "}", alice.headers),
        ("PATCH", f"/v1/chat/sessions/{sid}",
         '{"session_name": "after", "max_history_tokens": ' + number + "}", alice.headers),
        ("PUT", f"/chat/sessions/{sid}", '{"max_history_messages": ' + number + "}",
         alice.headers),
        ("POST", "/v1/chat/sessions/import", document, alice.headers),
        ("POST", f"/v1/chat/sessions/{sid}/fork", '{"up_to_seq": ' + number + "}",
         alice.headers),
        ("POST", f"/v1/chat/sessions/{sid}/merge",
         '{"source_session_id": "' + other + '", "x": ' + number + "}", alice.headers),
        ("POST", "/admin/users", '{"name": "nan-user", "x": ' + number + "}", admin),
        ("POST", f"/admin/users/{alice.id}/keys", '{"name": "k", "x": ' + number + "}", admin),
    ]
    sessions = await db.fetchval("SELECT count(*) FROM chat_sessions")
    keys = await db.fetchval("SELECT count(*) FROM api_keys")
    for method, path, body, headers in cases:
        r = await client.request(method, path, content=body.encode(),
                                 headers={**headers, "content-type": "application/json"})
        assert (method, path, r.status_code, r.json()) == (method, path, 400, INVALID_JSON)
    assert await db.fetchval("SELECT count(*) FROM chat_sessions") == sessions
    assert await db.fetchval("SELECT count(*) FROM api_keys") == keys
    r = await client.get(f"/v1/chat/sessions/{sid}", headers=alice.headers)
    assert (r.json()["session_name"], r.json()["is_active"]) == ("before", True)
    r = await client.get(f"/v1/chat/sessions/{other}", headers=alice.headers)
    assert r.json()["is_active"] is True


async def test_finite_numbers_still_pass_on_both_decoding_paths(
    client: Any, route: respx.Route, alice: User
) -> None:
    sid = await new_session(client, alice)
    for content in ("hi", "\\ud800"):  # msgspec's path, then the stdlib's
        body = ('{"model": "gpt-4o", "session_id": "' + sid + '", "temperature": 1.5e-3, '
                '"top_p": 1E2, "messages": [{"role": "user", "content": "' + content + '"}]}')
        r = await client.post(CHAT, content=body.encode(), headers=alice.headers)
        assert r.status_code == 200, r.text
        sent = route.calls[-1].request.content
        assert b'"temperature":0.0015' in sent and b'"top_p":100.0' in sent


# --- 9. header bytes beyond ASCII travel exactly --------------------------------------------

# UTF-8 `Café`, a byte that is not UTF-8, and a character beyond latin-1 (UTF-8 `€`).
ODD_VALUES = ["Café".encode(), b"caf\xe9 \xff", "5 €".encode()]


async def test_header_bytes_beyond_ascii_go_upstream_as_they_came(
    settings: Settings, upstream: respx.Router, route: respx.Route, alice: User
) -> None:
    # httpx's ASGI transport passes header bytes as they are (Litestar's test client re-encodes
    # them as UTF-8).
    async with app_client(settings, upstream) as raw_client:
        await _odd_headers_go_upstream(raw_client, upstream, route, alice)


async def _odd_headers_go_upstream(
    raw_client: LiveClient, upstream: respx.Router, route: respx.Route, alice: User
) -> None:
    models = upstream.get("/models").mock(
        return_value=httpx.Response(200, json={"object": "list", "data": []}))
    sid = await new_session(raw_client, alice)
    for value in ODD_VALUES:
        headers = [*alice.headers.items(), ("x-title", value)]
        for body in ({"session_id": sid}, {}):  # a turn, then the relay without a session
            r = await raw_client.post(CHAT, json={"model": "gpt-4o", "messages": [
                {"role": "user", "content": "hi"}], **body}, headers=headers)
            assert r.status_code == 200, r.text
            assert dict(route.calls[-1].request.headers.raw)[b"x-title"] == value
        r = await raw_client.get("/v1/models", headers=headers)  # a passthrough route
        assert r.status_code == 200, r.text
        assert dict(models.calls[-1].request.headers.raw)[b"x-title"] == value


async def test_header_bytes_beyond_ascii_come_back_from_upstream_as_they_came(
    settings: Settings, upstream: respx.Router, alice: User
) -> None:
    async with app_client(settings, upstream) as raw_client:
        await _odd_headers_come_back(raw_client, upstream, alice)


async def _odd_headers_come_back(
    raw_client: LiveClient, upstream: respx.Router, alice: User
) -> None:
    sid = await new_session(raw_client, alice)
    for value in ODD_VALUES:
        answer = httpx.Response(200, json=completion("fine"), headers=[(b"x-note", value)])
        upstream.post("/chat/completions").mock(return_value=answer)
        upstream.get("/models").mock(return_value=httpx.Response(
            200, json={"object": "list", "data": []}, headers=[(b"x-note", value)]))
        for body in ({"session_id": sid}, {}):
            r = await raw_client.post(CHAT, json={"model": "gpt-4o", "messages": [
                {"role": "user", "content": "hi"}], **body}, headers=alice.headers)
            assert r.status_code == 200, r.text
            assert dict(r.headers.raw)[b"x-note"] == value
        r = await raw_client.get("/v1/models", headers=alice.headers)
        assert (r.status_code, dict(r.headers.raw)[b"x-note"]) == (200, value)


# --- 15. headers named by `Connection` are hop-by-hop ------------------------------------------


async def test_headers_named_by_connection_are_not_forwarded_either_way(
    client: Any, upstream: respx.Router, alice: User
) -> None:
    hop = [(b"connection", b"close"), (b"connection", b"X-Hop-One , x-hop-two"),
           (b"x-hop-one", b"1"), (b"x-hop-two", b"2"), (b"x-kept", b"3")]
    answer = httpx.Response(200, json=completion("fine"), headers=hop)
    route = upstream.post("/chat/completions").mock(return_value=answer)
    models = upstream.get("/models").mock(
        return_value=httpx.Response(200, json={"object": "list", "data": []}, headers=hop))
    sid = await new_session(client, alice)
    headers = [(k.encode(), v.encode()) for k, v in alice.headers.items()] + hop
    for body in ({"session_id": sid}, {}):
        r = await client.post(CHAT, json={"model": "gpt-4o", "messages": [
            {"role": "user", "content": "hi"}], **body}, headers=headers)
        assert r.status_code == 200, r.text
        sent = route.calls[-1].request.headers
        assert (sent.get("x-hop-one"), sent.get("x-hop-two"), sent["x-kept"]) == (None, None, "3")
        assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert (r.headers.get("x-hop-one"), r.headers.get("x-hop-two")) == (None, None)
        assert r.headers["x-kept"] == "3"
    r = await client.get("/v1/models", headers=headers)
    assert r.status_code == 200
    sent = models.calls[-1].request.headers
    assert (sent.get("x-hop-one"), sent.get("x-hop-two"), sent["x-kept"]) == (None, None, "3")
    assert (r.headers.get("x-hop-one"), r.headers.get("x-hop-two"), r.headers["x-kept"]) == (
        None, None, "3")


async def test_connection_cannot_strip_the_proxys_own_headers(
    client: Any, route: respx.Route, alice: User
) -> None:
    headers = {**alice.headers, "connection": "authorization, accept-encoding, host"}
    r = await client.post(CHAT, json={"model": "gpt-4o", "messages": [
        {"role": "user", "content": "hi"}]}, headers=headers)
    assert r.status_code == 200, r.text
    sent = route.calls[-1].request.headers
    assert (sent["authorization"], sent["accept-encoding"], sent["host"]) == (
        f"Bearer {UPSTREAM_KEY}", "identity", "upstream.test")


# --- 5 and 13. a passthrough path never leaves the upstream's base --------------------------

BAD_PATH = {"error": {
    "message": "Invalid path: dot segments, backslashes, encoded ? or #, and characters other "
               "than printable ASCII are not allowed",
    "type": "invalid_request_error", "param": "path", "code": "invalid_value"}}
ESCAPING = [
    b"/v1/../../internal/billing", b"/v1/./models", b"/v1/models/..",
    b"/v1/%2e%2e/%2e%2e/internal/keys", b"/v1/%2E%2e/internal", b"/v1/.%2E/internal",
    b"/v1/models/%2e", b"/v1/x%2F..%2F..%2Finternal", b"/v1/x%2f%2e%2e%2finternal",
    b"/v1/..\\internal", b"/v1/%5C..%5Cinternal", b"/v1/models%3Fadmin=1",
    b"/v1/models%23frag", b"/v1/models%0D%0AX-Injected:%201", b"/v1/models%0a",
    b"/v1/models%00", b"/v1/models%7F", b"/v1/caf\xc3\xa9", b"/v1/a b",
]
# As sent -> as the upstream gets it (under its base URL, http://upstream.test/v1).
KEPT = [
    (b"/v1/models", b"/v1/models"),
    (b"/v1/models/anthropic%2Fclaude-3", b"/v1/models/anthropic/claude-3"),  # the SDK's way
    (b"/v1/files/a%20b%25c", b"/v1/files/a%20b%25c"),
    (b"/v1/files/report.v2..final", b"/v1/files/report.v2..final"),
    (b"/v1/files/%252e%252e", b"/v1/files/%252e%252e"),  # a literal "%2e%2e" in a name
]


async def asgi_get(app: Any, raw_path: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """One GET with `raw_path` exactly as given (every HTTP client normalises dot segments)."""
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    status, _, body = await asgi_exchange(app, "GET", raw_path, raw)
    return status, body


async def test_passthrough_paths_that_could_leave_the_base_are_400_and_never_sent(
    settings: Settings, alice: User
) -> None:
    anywhere = respx.Router(assert_all_called=False)  # any host, any path: every request lands
    sent = anywhere.route().mock(return_value=httpx.Response(200, json={"ok": True}))
    async with app_client(settings, anywhere) as live:
        for raw_path in ESCAPING:
            status, body = await asgi_get(live.app, raw_path, alice.headers)
            assert (raw_path, status, json.loads(body)) == (raw_path, 400, BAD_PATH)
        assert sent.call_count == 0
        for raw_path, arrived in KEPT:
            status, _ = await asgi_get(live.app, raw_path, alice.headers)
            assert status == 200
            url = sent.calls[-1].request.url
            assert (url.host, url.raw_path) == ("upstream.test", arrived)


async def test_control_characters_in_admin_path_ids_are_404_not_500(
    client: Any, alice: User, admin_headers: dict[str, str], db: asyncpg.Connection
) -> None:
    keys = await db.fetchval("SELECT count(*) FROM api_keys")
    for bad in ("%00", "user_%00x", "a%0D%0Ab", "%7F", "%C3%A9", "x" * 65):
        for method, path, param in (
            ("POST", f"/admin/users/{bad}/keys", "user_id"),
            ("GET", f"/admin/users/{bad}/keys", "user_id"),
            ("DELETE", f"/admin/keys/{bad}", "key_id"),
        ):
            r = await client.request(method, path, headers=admin_headers)
            what = "User" if param == "user_id" else "Key"
            assert (method, path, r.status_code, r.json()) == (method, path, 404, {"error": {
                "message": f"{what} not found", "type": "invalid_request_error",
                "param": param, "code": "not_found"}})
    assert await db.fetchval("SELECT count(*) FROM api_keys") == keys
    r = await client.get(f"/admin/users/{alice.id}/keys", headers=admin_headers)
    assert r.status_code == 200 and r.json()["data"][0]["revoked_at"] is None
