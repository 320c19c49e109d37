"""Keys (format, hashing, refusal paths) and the admin API for users and keys."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from proxy import auth, keylease
from proxy.app import create_app
from proxy.config import Settings
from proxy.errors import Forbidden, NotFound, Unauthorized
from tests.conftest import ADMIN_KEY, User, configured

KEY_RE = re.compile(r"^sk-cp-[A-Za-z0-9_-]{43}$")
ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def err(status_type: str, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": status_type, "param": param, "code": code}}


def invalid(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return err("invalid_request_error", code, message, param)


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(settings), base_url="http://proxy.test") as client:
        yield client


# --- keys ---------------------------------------------------------------------------------------


def test_generated_keys_have_the_format_and_32_random_bytes() -> None:
    keys = {auth.generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert KEY_RE.match(key), key
        raw = base64.urlsafe_b64decode(key.removeprefix("sk-cp-") + "=")
        assert len(raw) == 32


def test_hash_and_prefix() -> None:
    key = auth.generate_key()
    assert auth.hash_key(key) == hashlib.sha256(key.encode()).digest()
    assert auth.display_prefix(key) == key[:12]
    assert auth.display_prefix(key).startswith("sk-cp-")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "Missing API key: send 'Authorization: Bearer sk-cp-...'"),
        ("", "Missing API key: send 'Authorization: Bearer sk-cp-...'"),
        ("Bearer", "Missing API key: send 'Authorization: Bearer sk-cp-...'"),
        ("Bearer    ", "Missing API key: send 'Authorization: Bearer sk-cp-...'"),
        ("Basic dXNlcjpwYXNz", "Missing API key: send 'Authorization: Bearer sk-cp-...'"),
        ("Bearer sk-cp-short", "Invalid API key"),
        ("Bearer sk-proj-" + "a" * 43, "Invalid API key"),
        ("Bearer sk-cp-" + "a" * 42 + "!", "Invalid API key"),
        ("Bearer sk-cp-" + "a" * 44, "Invalid API key"),
        ("Bearer sk-cp-" + "a" * 20 + " " + "a" * 22, "Invalid API key"),
        ("Bearer sk-cp-" + "a" * 43 + "\n" + "a", "Invalid API key"),
    ],
)
def test_malformed_client_keys_are_refused_without_a_lookup(
    header: str | None, message: str
) -> None:
    with pytest.raises(Unauthorized) as caught:
        auth.client_key_hash(header)
    assert caught.value.body() == invalid("invalid_api_key", message)


def test_a_well_formed_key_gives_its_hash() -> None:
    key = auth.generate_key()
    assert auth.client_key_hash(f"Bearer {key}") == auth.hash_key(key)
    assert auth.client_key_hash(f"bearer {key}") == auth.hash_key(key)


def test_admin_check() -> None:
    with pytest.raises(NotFound):
        auth.check_admin(f"Bearer {ADMIN_KEY}", None)
    with pytest.raises(Unauthorized):
        auth.check_admin(None, ADMIN_KEY)
    with pytest.raises(Unauthorized):
        auth.check_admin("Bearer wrong", ADMIN_KEY)
    with pytest.raises(Unauthorized):
        auth.check_admin(f"Bearer {ADMIN_KEY}x", ADMIN_KEY)
    with pytest.raises(Forbidden):
        auth.check_admin(f"Bearer {auth.generate_key()}", ADMIN_KEY)
    auth.check_admin(f"Bearer {ADMIN_KEY}", ADMIN_KEY)
    auth.check_admin(f"Bearer {ADMIN_KEY}é", f"{ADMIN_KEY}é")


async def test_only_the_hash_and_prefix_are_stored(client, db: asyncpg.Connection, alice: User):
    row = await db.fetchrow("SELECT * FROM api_keys WHERE id = $1", alice.key_id)
    assert bytes(row["key_hash"]) == hashlib.sha256(alice.key.encode()).digest()
    assert row["prefix"] == alice.key[:12]
    for value in dict(row).values():
        assert alice.key not in str(value)


@pytest.mark.parametrize("path", ["/v1/chat/sessions", "/chat/sessions"])
async def test_client_requests_need_a_known_active_key(client, alice: User, path: str) -> None:
    missing = invalid("invalid_api_key", "Missing API key: send 'Authorization: Bearer sk-cp-...'")
    bad = invalid("invalid_api_key", "Invalid API key")
    r = await client.get(path)
    assert (r.status_code, r.json()) == (401, missing)
    r = await client.get(path, headers={"Authorization": "Bearer nope"})
    assert (r.status_code, r.json()) == (401, bad)
    r = await client.get(path, headers={"Authorization": f"Bearer {auth.generate_key()}"})
    assert (r.status_code, r.json()) == (401, bad)
    r = await client.get(path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert (r.status_code, r.json()) == (401, bad)
    r = await client.get(path, headers=alice.headers)
    assert r.status_code == 200


async def test_a_revoked_key_is_refused_on_the_next_request(
    client, db: asyncpg.Connection, alice: User
) -> None:
    assert (await client.get("/v1/chat/sessions", headers=alice.headers)).status_code == 200
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", alice.key_id)
    # A revocation by hand in SQL is refused once its notification is heard (milliseconds, more
    # on a loaded machine); `settle` is the wait after which no process can still trust the key.
    await keylease.settle()
    r = await client.get("/v1/chat/sessions", headers=alice.headers)
    assert (r.status_code, r.json()) == (401, invalid("invalid_api_key", "Invalid API key"))


# --- the admin API ------------------------------------------------------------------------------


ADMIN_ROUTES = [
    ("POST", "/admin/users", {"name": "x"}),
    ("GET", "/admin/users", None),
    ("POST", "/admin/users/user_x/keys", {}),
    ("GET", "/admin/users/user_x/keys", None),
    ("DELETE", "/admin/keys/key_x", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
async def test_admin_routes_refuse_missing_wrong_and_user_keys(
    client, alice: User, method: str, path: str, body: Any
) -> None:
    cases = [
        ({}, 401, invalid("invalid_api_key", "Missing admin key")),
        ({"Authorization": "Bearer wrong"}, 401, invalid("invalid_api_key", "Invalid admin key")),
        (alice.headers, 403,
         invalid("insufficient_permissions", "This key cannot use the admin API")),
    ]
    for headers, status, expected in cases:
        r = await client.request(method, path, headers=headers, json=body)
        assert (r.status_code, r.json()) == (status, expected), headers


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
async def test_without_an_admin_key_the_admin_api_is_an_unknown_route(
    settings: Settings, alice: User, method: str, path: str, body: Any
) -> None:
    async with app_client(configured(settings, admin_key=None)) as client:
        for headers in ({}, {"Authorization": f"Bearer {ADMIN_KEY}"}, alice.headers):
            r = await client.request(method, path, headers=headers, json=body)
            expected = invalid("not_found", f"Unknown route: {method} {path}")
            assert (r.status_code, r.json()) == (404, expected)
        unknown = await client.get("/admin/nothing-here")
        assert unknown.json() == invalid("not_found", "Unknown route: GET /admin/nothing-here")


async def test_create_and_list_users(client, admin_headers: dict[str, str]) -> None:
    r = await client.post("/admin/users", json={"name": "carol-admin-test"}, headers=admin_headers)
    assert r.status_code == 201, r.text
    user = r.json()
    assert set(user) == {"id", "name", "created_at"}
    assert user["id"].startswith("user_")
    assert user["name"] == "carol-admin-test"
    assert ISO_RE.match(user["created_at"])

    again = await client.post("/admin/users", json={"name": "carol-admin-test"},
                              headers=admin_headers)
    assert (again.status_code, again.json()) == (409, invalid(
        "conflict", "A user named 'carol-admin-test' already exists", "name"))

    listed = await client.get("/admin/users", headers=admin_headers)
    assert listed.status_code == 200
    body = listed.json()
    assert body["object"] == "list"
    assert user in body["data"]
    assert [u["name"] for u in body["data"]].count("carol-admin-test") == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, invalid("missing_required_parameter", "Missing required parameter: name", "name")),
        ({"name": ""}, invalid(
            "invalid_value", "Invalid value for name: String should have at least 1 character",
            "name")),
        ({"name": 5}, invalid("invalid_value", "Invalid value for name: Input should be a valid "
                              "string", "name")),
        ({"name": "a\nb"}, invalid(
            "invalid_value", "Invalid value for name: String should match pattern "
            "'^[^\\x00-\\x1f\\x7f]+$'", "name")),
        ({"name": "a\ud800"}, invalid(
            "invalid_value", "Invalid value for name: Input should be a valid string, unable to "
            "parse raw data as a unicode string", "name")),
        ({"name": "dave", "id": "user_mine"}, invalid(
            "unknown_parameter", "Unknown parameter: id", "id")),
        (["dave"], invalid("invalid_value", "The request body must be a JSON object")),
    ],
)
async def test_bad_new_user_bodies(client, admin_headers, body: Any, expected: Any) -> None:
    # Encoded here with ASCII escapes: httpx cannot encode a lone surrogate itself.
    r = await client.post("/admin/users", content=json.dumps(body).encode(),
                          headers={**admin_headers, "Content-Type": "application/json"})
    assert (r.status_code, r.json()) == (400, expected)


async def test_keys_issue_list_and_revoke(client, admin_headers: dict[str, str]) -> None:
    user = (await client.post("/admin/users", json={"name": "erin-admin-test"},
                              headers=admin_headers)).json()
    r = await client.post(f"/admin/users/{user['id']}/keys", json={"name": "laptop"},
                          headers=admin_headers)
    assert r.status_code == 201, r.text
    issued = r.json()
    assert set(issued) == {"id", "object", "key", "prefix", "name", "user_id", "created_at"}
    assert KEY_RE.match(issued["key"])
    assert issued["id"].startswith("key_")
    assert (issued["object"], issued["prefix"], issued["name"], issued["user_id"]) == (
        "api_key", issued["key"][:12], "laptop", user["id"])

    # A body is optional; so is the name.
    r2 = await client.post(f"/admin/users/{user['id']}/keys", headers=admin_headers)
    assert r2.status_code == 201, r2.text
    second = r2.json()
    assert second["name"] is None
    assert second["key"] != issued["key"]

    headers = {"Authorization": f"Bearer {issued['key']}"}
    created = await client.post("/v1/chat/sessions", json={}, headers=headers)
    assert created.status_code == 201

    listed = await client.get(f"/admin/users/{user['id']}/keys", headers=admin_headers)
    assert listed.status_code == 200
    assert listed.json() == {"object": "list", "data": [
        {"id": k["id"], "object": "api_key", "user_id": user["id"], "prefix": k["prefix"],
         "name": k["name"], "created_at": k["created_at"], "revoked_at": None}
        for k in (issued, second)
    ]}
    assert issued["key"] not in listed.text

    revoked = await client.delete(f"/admin/keys/{issued['id']}", headers=admin_headers)
    assert (revoked.status_code, revoked.content) == (204, b"")
    refused = await client.get("/v1/chat/sessions", headers=headers)
    assert (refused.status_code, refused.json()) == (
        401, invalid("invalid_api_key", "Invalid API key"))
    # The other key still works; revoking twice is harmless.
    other = {"Authorization": f"Bearer {second['key']}"}
    assert (await client.get("/v1/chat/sessions", headers=other)).status_code == 200
    assert (await client.delete(f"/admin/keys/{issued['id']}",
                                headers=admin_headers)).status_code == 204
    keys = (await client.get(f"/admin/users/{user['id']}/keys", headers=admin_headers)).json()
    assert ISO_RE.match(keys["data"][0]["revoked_at"])
    assert keys["data"][1]["revoked_at"] is None


async def test_admin_404s_for_unknown_users_and_keys(client, admin_headers, alice: User) -> None:
    for method, path in (("POST", "/admin/users/user_nobody/keys"),
                         ("GET", "/admin/users/user_nobody/keys")):
        r = await client.request(method, path, headers=admin_headers)
        assert (r.status_code, r.json()) == (404, invalid(
            "not_found", "User user_nobody not found", "user_id")), method
    # A user's name is not their id on the admin API.
    r = await client.get(f"/admin/users/{alice.name}/keys", headers=admin_headers)
    assert r.status_code == 404
    r = await client.post(f"/admin/users/{alice.name}/keys", headers=admin_headers)
    assert r.status_code == 404
    r = await client.delete("/admin/keys/key_nobody", headers=admin_headers)
    assert (r.status_code, r.json()) == (404, invalid(
        "not_found", "Key key_nobody not found", "key_id"))


async def test_bad_new_key_bodies(client, admin_headers, alice: User) -> None:
    path = f"/admin/users/{alice.id}/keys"
    r = await client.post(path, json={"name": "x", "user_id": "user_other"},
                          headers=admin_headers)
    assert (r.status_code, r.json()) == (400, invalid(
        "unknown_parameter", "Unknown parameter: user_id", "user_id"))
    r = await client.post(path, json={"name": 3}, headers=admin_headers)
    assert (r.status_code, r.json()) == (400, invalid(
        "invalid_value", "Invalid value for name: Input should be a valid string", "name"))
    r = await client.post(path, content=b"{", headers={**admin_headers,
                                                       "Content-Type": "application/json"})
    assert (r.status_code, r.json()) == (400, invalid(
        "invalid_json", "The request body is not valid JSON"))
