"""Every error the proxy itself produces is OpenAI's envelope; the whole body is asserted."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from litestar import get, post
from litestar.testing import AsyncTestClient

from proxy.app import create_app
from proxy.config import Settings
from proxy.store import sessions
from tests.conftest import User, configured
from tests.fault_helpers import asgi_exchange

SESSIONS = "/v1/chat/sessions"
SECRET = "password=hunter2 at /srv/secret.py line 42"


def envelope(status_type: str, code: str, message: str, param: str | None = None) -> Any:
    return {"error": {"message": message, "type": status_type, "param": param, "code": code}}


def invalid(code: str, message: str, param: str | None = None) -> Any:
    return envelope("invalid_request_error", code, message, param)


INTERNAL = envelope("server_error", "internal_error", "Internal server error")


@get("/test/items/{number:int}", sync_to_thread=False)
def typed_path(number: int) -> dict[str, int]:
    return {"number": number}


@get("/test/query", sync_to_thread=False)
def typed_query(number: int) -> dict[str, int]:
    return {"number": number}


@post("/test/boom", sync_to_thread=False)
def boom() -> None:
    raise RuntimeError(SECRET)


@asynccontextmanager
async def app_client(settings: Settings, *, test_routes: bool = False,
                     **kwargs: Any) -> AsyncIterator[AsyncTestClient[Any]]:
    """An app with test-only routes registered next to the real ones."""
    app = create_app(settings)
    if test_routes:
        app.register(typed_path)
        app.register(typed_query)
        app.register(boom)
    async with AsyncTestClient(app=app, base_url="http://proxy.test", **kwargs) as client:
        yield client


def assert_json_error(response: Any, status: int, body: Any) -> None:
    assert response.headers["content-type"] == "application/json"
    assert (response.status_code, response.json()) == (status, body)


# --- bodies -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{", "The request body is not valid JSON"),
        (b'{"a": 1} trailing', "The request body is not valid JSON"),
        (b"\xff\xfe{}", "The request body is not valid JSON"),
        (b"{'single': 'quotes'}", "The request body is not valid JSON"),
        (b"[" * 100 + b"]" * 100, "JSON nested deeper than 64 levels"),
    ],
)
async def test_malformed_json(client, alice: User, admin_headers, content: bytes, message: str):
    expected = invalid("invalid_json", message)
    for path, headers in ((SESSIONS, alice.headers), ("/admin/users", admin_headers)):
        r = await client.post(path, content=content,
                              headers={**headers, "Content-Type": "application/json"})
        assert_json_error(r, 400, expected)


async def test_an_empty_body_where_one_is_required(client, admin_headers) -> None:
    r = await client.post("/admin/users", content=b"",
                          headers={**admin_headers, "Content-Type": "application/json"})
    assert_json_error(r, 400, invalid("invalid_json", "The request body must be a JSON object"))


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml"])
async def test_wrong_content_type(client, alice: User, content_type: str) -> None:
    r = await client.post(SESSIONS, content=b'{"session_name": "x"}',
                          headers={**alice.headers, "Content-Type": content_type})
    assert_json_error(r, 400, invalid("invalid_value", "Content-Type must be application/json"))


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "APPLICATION/JSON",
                                          "application/merge-patch+json"])
async def test_json_content_types_are_accepted(client, alice: User, content_type: str) -> None:
    r = await client.post(SESSIONS, content=b'{"session_name": "x"}',
                          headers={**alice.headers, "Content-Type": content_type})
    assert r.status_code == 201, r.text


# --- routes and methods -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/nope", "/v2/chat/completions", "/admin",
                                  "/chat/completions", "/chat/sessions/sess_x/nothing",
                                  "/health/extra"])
async def test_unknown_routes_outside_v1(client, alice: User, path: str) -> None:
    for method in ("GET", "POST"):
        r = await client.request(method, path, headers=alice.headers)
        assert_json_error(r, 404, invalid("not_found", f"Unknown route: {method} {path}"))


@pytest.mark.parametrize(("path", "methods"), [
    ("/v1/chat/sessions", {"GET", "POST"}),
    ("/chat/sessions/sess_x", {"GET", "PATCH", "PUT", "DELETE"}),
    ("/v1/chat/sessions/sess_x/messages", {"GET", "DELETE"}),
    ("/v1/conversations/conv_x", {"GET", "POST", "DELETE"}),
    ("/health", {"GET"}),
])
async def test_options_allows_every_method_of_the_path(
    client, path: str, methods: set[str]
) -> None:
    r = await client.options(path)
    assert r.status_code == 204
    assert set(r.headers["allow"].replace(" ", "").split(",")) == methods | {"OPTIONS"}


async def test_a_method_a_route_does_not_take(client, alice: User) -> None:
    r = await client.delete("/health")
    assert_json_error(r, 405, invalid("method_not_allowed", "Method DELETE not allowed on /health"))
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "OPTIONS"}
    r = await client.post("/chat/sessions/sess_x/messages", headers=alice.headers)
    assert_json_error(r, 405, invalid(
        "method_not_allowed", "Method POST not allowed on /chat/sessions/sess_x/messages"))
    r = await client.put("/admin/users")
    assert_json_error(r, 405, invalid("method_not_allowed",
                                      "Method PUT not allowed on /admin/users"))


async def test_litestar_parameter_validation(settings: Settings) -> None:
    async with app_client(settings, test_routes=True) as client:
        assert (await client.get("/test/items/3")).json() == {"number": 3}
        # A path parameter of the wrong type matches no route.
        r = await client.get("/test/items/three")
        assert_json_error(r, 404, invalid("not_found", "Unknown route: GET /test/items/three"))
        assert (await client.get("/test/query?number=4")).json() == {"number": 4}
        r = await client.get("/test/query?number=four")
        assert_json_error(r, 400, invalid("invalid_value", "Invalid value for number", "number"))
        r = await client.get("/test/query")
        assert_json_error(r, 400, invalid("missing_required_parameter",
                                          "Missing required parameter: number", "number"))


# --- size ---------------------------------------------------------------------------------------

TOO_LARGE = invalid("request_too_large", "Request body too large")


async def test_oversized_bodies_with_content_length(settings: Settings, alice: User) -> None:
    async with app_client(configured(settings, max_body_bytes=1024)) as client:
        fits = b'{"session_name": "' + b"x" * 900 + b'"}'
        r = await client.post(SESSIONS, content=fits,
                              headers={**alice.headers, "Content-Type": "application/json"})
        assert r.status_code == 201, r.text
        body = b'{"session_name": "' + b"x" * 2000 + b'"}'
        admin = {"Authorization": f"Bearer {settings.admin_key}"}
        for method, path, headers in (("POST", SESSIONS, alice.headers),
                                      ("PATCH", f"{SESSIONS}/{r.json()['id']}", alice.headers),
                                      ("POST", "/admin/users", admin)):
            r2 = await client.request(method, path, content=body,
                                      headers={**headers, "Content-Type": "application/json"})
            assert r2.request.headers["content-length"] == str(len(body))
            assert_json_error(r2, 413, TOO_LARGE)
        # Nothing was stored by the refused requests.
        assert (await client.get(SESSIONS, headers=alice.headers)).json()["total"] == 1


async def asgi_request(
    client: AsyncTestClient[Any], method: str, path: str, headers: dict[str, str],
    chunks: list[bytes],
) -> tuple[int, dict[str, str], bytes]:
    """Send a request straight to the running app as chunks, with no Content-Length.

    (The test client always reads the whole body first; a server sees this for a chunked body.)
    """
    # The app (and its pool) lives on the test client's own event loop, in another thread.
    async def run(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.to_thread(client.blocking_portal.call, client.app, scope, receive, send)

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"transfer-encoding", b"chunked"))
    return await asgi_exchange(run, method, path.encode(), raw, chunks)


async def test_oversized_chunked_bodies_without_content_length(
    settings: Settings, alice: User
) -> None:
    def chunks(count: int) -> list[bytes]:
        return [b'{"session_name": "', *([b"x" * 256] * count), b'"}']

    headers = {**alice.headers, "Content-Type": "application/json"}
    async with app_client(configured(settings, max_body_bytes=1024)) as client:
        status, _, body = await asgi_request(client, "POST", SESSIONS, headers, chunks(2))
        assert status == 201, body
        status, response_headers, body = await asgi_request(
            client, "POST", SESSIONS, headers, chunks(10))
        assert (status, response_headers["content-type"]) == (413, "application/json")
        assert json.loads(body) == TOO_LARGE
        assert (await client.get(SESSIONS, headers=alice.headers)).json()["total"] == 1


# --- unexpected exceptions ----------------------------------------------------------------------


async def test_an_unexpected_exception_is_a_500_that_says_nothing_internal(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with app_client(settings, test_routes=True) as client:
        with caplog.at_level(logging.ERROR, logger="chatproxy"):
            r = await client.post("/test/boom", headers={"X-Request-Id": "req-boom-1"})
    assert_json_error(r, 500, INTERNAL)
    assert SECRET not in r.text and "RuntimeError" not in r.text
    assert r.headers["x-request-id"] == "req-boom-1"
    [record] = [rec for rec in caplog.records if rec.name == "chatproxy"]
    assert record.getMessage() == "unhandled error on POST /test/boom (request id req-boom-1)"
    assert record.exc_info is not None and str(record.exc_info[1]) == SECRET


async def test_a_failing_store_function_is_a_500_with_the_request_id_logged(
    client, alice: User, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError(SECRET)

    monkeypatch.setattr(sessions, "list_sessions", broken)
    with caplog.at_level(logging.ERROR, logger="chatproxy"):
        r = await client.get(SESSIONS, headers=alice.headers)
    assert_json_error(r, 500, INTERNAL)
    assert SECRET not in r.text
    request_id = r.headers["x-request-id"]
    assert len(request_id) == 32  # made by the proxy: the client sent none
    [record] = [rec for rec in caplog.records if rec.name == "chatproxy"]
    assert record.getMessage() == (
        f"unhandled error on GET /v1/chat/sessions (request id {request_id})")
    assert record.exc_info is not None


async def test_request_ids_are_echoed_or_made(client) -> None:
    r = await client.get("/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    made = (await client.get("/health")).headers["x-request-id"]
    assert len(made) == 32 and made != (await client.get("/health")).headers["x-request-id"]
    # An unprintable or oversized id is replaced, never echoed.
    for bad in ("a b", "x" * 129):
        assert (await client.get("/health", headers={"X-Request-Id": bad})).headers[
            "x-request-id"] != bad
    r = await client.get("/nope", headers={"X-Request-Id": "abc-404"})
    assert (r.status_code, r.headers["x-request-id"]) == (404, "abc-404")
