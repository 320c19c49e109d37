"""`/schema/openapi.json` (contract §8, issue 7 item 5): every route the proxy owns is there with
its request body, its success answer and its error statuses, and real answers and requests
agree with what it says (checked with a JSON Schema validator)."""

from __future__ import annotations

import re
from typing import Any

import httpx
import jsonschema_rs
import pytest
import respx
import schemathesis

from proxy.responses.shapes import ResponseCreate
from tests.conftest import User
from tests.turns import Client, completion, u

Json = dict[str, Any]
ERRORS = "#/components/schemas/ErrorResponse"

# method, path, request body (None, "optional", "required"), its properties, success status,
# success schema, error statuses
Row = tuple[str, str, str | None, frozenset[str], int, str | None, frozenset[int]]

SESSION_FIELDS = frozenset({"session_name", "model", "system_prompt", "max_history_messages",
                            "max_history_tokens", "metadata"})
NONE: frozenset[str] = frozenset()


def session_rows(prefix: str) -> list[Row]:
    s = prefix + "/{session_id}"
    rows: list[tuple[str, str, str | None, frozenset[str], int, str | None, set[int]]] = [
        ("post", prefix, "optional", SESSION_FIELDS, 201, "Session", {400, 401, 413, 503}),
        ("get", prefix, None, NONE, 200, "SessionList", {400, 401, 503}),
        ("get", s, None, NONE, 200, "Session", {401, 404, 503}),
        ("put", s, "optional", SESSION_FIELDS, 200, "Session", {400, 401, 404, 413, 503}),
        ("patch", s, "optional", SESSION_FIELDS, 200, "Session", {400, 401, 404, 413, 503}),
        ("delete", s, None, NONE, 204, None, {401, 404, 503}),
        ("get", s + "/messages", None, NONE, 200, "MessageList", {400, 401, 404, 503}),
        ("post", s + "/restore", None, NONE, 200, "Session", {401, 404, 503}),
        ("delete", s + "/messages", None, NONE, 204, None, {401, 404, 503}),
        ("get", s + "/export", None, NONE, 200, "ExportDocument", {401, 404, 429, 503}),
        ("post", prefix + "/import", "required",
         frozenset({"format", "session", "summary", "messages"}), 201, "Session",
         {400, 401, 413, 503}),
        ("post", s + "/fork", "optional", frozenset({"up_to_seq", "session_name"}), 201,
         "Session", {400, 401, 404, 413, 503}),
        ("post", s + "/merge", "required", frozenset({"source_session_id"}), 200, "Session",
         {400, 401, 404, 413, 503}),
        ("get", s + "/summary", None, NONE, 200, "Summary", {401, 404, 503}),
        ("post", s + "/compact", "optional", NONE, 200, "Summary",
         {400, 401, 404, 409, 413, 502, 503, 504}),
        ("get", prefix.replace("/sessions", "/search"), None, NONE, 200, "SearchList",
         {400, 401, 404, 503}),
    ]
    return [(*row[:6], frozenset(row[6])) for row in rows]


ADMIN = {401, 403, 404, 503}
CONVERSATION = "/v1/conversations/{conversation_id}"
ROWS: list[Row] = [
    *session_rows("/v1/chat/sessions"),
    *session_rows("/chat/sessions"),
    ("post", "/admin/users", "required", frozenset({"name"}), 201, "User",
     frozenset(ADMIN | {400, 409, 413})),
    ("get", "/admin/users", None, NONE, 200, "UserList", frozenset(ADMIN)),
    ("post", "/admin/users/{user_id}/keys", "optional", frozenset({"name"}), 201, "NewApiKey",
     frozenset(ADMIN | {400, 413})),
    ("get", "/admin/users/{user_id}/keys", None, NONE, 200, "ApiKeyList", frozenset(ADMIN)),
    ("delete", "/admin/keys/{key_id}", None, NONE, 204, None, frozenset(ADMIN)),
    ("post", "/v1/chat/completions", "required",
     frozenset({"model", "messages", "stream", "session_id", "max_history_messages"}), 200, None,
     frozenset({400, 401, 404, 409, 413, 422, 502, 503, 504})),
    ("post", "/v1/responses", "required", frozenset(ResponseCreate.model_fields), 200,
     "ResponseObject", frozenset({400, 401, 404, 409, 413, 422, 502, 503, 504})),
    ("get", "/v1/responses/{response_id}", None, NONE, 200, "ResponseObject",
     frozenset({400, 401, 404, 503})),
    ("get", "/v1/responses/{response_id}/input_items", None, NONE, 200, "ItemList",
     frozenset({400, 401, 404, 503})),
    ("delete", "/v1/responses/{response_id}", None, NONE, 200, "DeletedResponse",
     frozenset({401, 404, 503})),
    ("post", "/v1/conversations", "optional", frozenset({"items", "metadata"}), 200,
     "Conversation", frozenset({400, 401, 413, 503})),
    ("get", CONVERSATION, None, NONE, 200, "Conversation", frozenset({401, 404, 503})),
    ("post", CONVERSATION, "required", frozenset({"metadata"}), 200, "Conversation",
     frozenset({400, 401, 404, 413, 503})),
    ("delete", CONVERSATION, None, NONE, 200, "DeletedConversation", frozenset({401, 404, 503})),
    ("get", CONVERSATION + "/items", None, NONE, 200, "ItemList",
     frozenset({400, 401, 404, 503})),
    ("post", CONVERSATION + "/items", "required", frozenset({"items"}), 200, "ItemList",
     frozenset({400, 401, 404, 413, 503})),
    ("get", CONVERSATION + "/items/{item_id}", None, NONE, 200, None, frozenset({401, 404, 503})),
    ("delete", CONVERSATION + "/items/{item_id}", None, NONE, 200, "Conversation",
     frozenset({401, 404, 503})),
]
OPERATIONS = {"get", "put", "post", "delete", "patch"}


@pytest.fixture
async def schema(client: Client) -> Json:
    r = await client.get("/schema/openapi.json")
    assert r.status_code == 200
    body: Json = r.json()
    return body


def validator(schema: Json, name: str) -> Any:
    root = {"$ref": f"#/components/schemas/{name}", "components": schema["components"]}
    return jsonschema_rs.validator_for(root, validate_formats=True)


def body_validator(schema: Json, path: str, method: str = "post") -> Any:
    body = schema["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema_rs.validator_for(body, validate_formats=True)


def check(schema: Json, name: str, value: Any) -> None:
    errors = [e.message for e in validator(schema, name).iter_errors(value)]
    assert errors == [], (name, value)


# --- what the document lists ------------------------------------------------------------------


async def test_every_owned_route_is_listed_and_nothing_else(schema: Json) -> None:
    listed = {(method, path) for path, item in schema["paths"].items()
              for method in item if method in OPERATIONS}
    expected = {(row[0], row[1]) for row in ROWS} | {
        ("get", "/health"), ("get", "/ready"), ("get", "/metrics"), ("get", "/ui")}
    assert listed == expected


@pytest.mark.parametrize("row", ROWS, ids=lambda row: f"{row[0].upper()} {row[1]}")
async def test_each_route_has_its_body_its_answer_and_its_errors(schema: Json, row: Row) -> None:
    method, path, body, fields, status, answer, errors = row
    operation = schema["paths"][path][method]
    assert operation["summary"] and operation["tags"]
    assert set(operation["responses"]) == {str(status), *(str(e) for e in errors)}

    if body is None:
        assert "requestBody" not in operation
    else:
        request = operation["requestBody"]
        assert request["required"] is (body == "required")
        assert set(request["content"]) == {"application/json"}
        described = request["content"]["application/json"]["schema"]
        assert described["type"] == "object"
        assert set(described["properties"]) == fields
        assert "$ref" not in str(described)  # inlined: nothing dangles

    success = operation["responses"][str(status)]
    if status == 204:
        assert "content" not in success
    elif answer is not None:
        assert success["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{answer}"}
    for error in errors:
        response = operation["responses"][str(error)]
        assert response["description"]
        content = response["content"]["application/json"]
        assert content["schema"] == {"$ref": ERRORS}
        (example,) = content["examples"].values()
        check(schema, "ErrorResponse", example["value"])
        assert example["value"]["error"]["type"] == (
            "server_error" if error >= 500 else "invalid_request_error")
    security = "adminKey" if path.startswith("/admin") else "userKey"
    assert operation["security"] == [{security: []}]
    assert security in schema["components"]["securitySchemes"]


async def test_the_chat_route_documents_its_headers_and_its_stream(schema: Json) -> None:
    operation = schema["paths"]["/v1/chat/completions"]["post"]
    assert {(p["name"], p["in"]) for p in operation["parameters"]} == {
        ("X-Session-Id", "header"), ("Idempotency-Key", "header")}
    ok = operation["responses"]["200"]
    assert set(ok["content"]) == {"application/json", "text/event-stream"}
    assert set(ok["headers"]) == {"X-Session-Id", "X-History-Messages", "X-History-Tokens",
                                  "X-History-Dropped", "X-History-Stored", "X-History-Overlap",
                                  "X-History-Summary-Seq", "X-History-Retried",
                                  "Idempotent-Replayed"}
    assert ok["headers"]["X-History-Overlap"]["schema"] == {"type": "integer"}
    examples = operation["responses"]["409"]["content"]["application/json"]["examples"]
    assert [e["value"]["error"]["code"] for e in examples.values()] == ["idempotency_key_in_use"]


async def test_list_routes_document_their_query_parameters(schema: Json) -> None:
    def params(path: str) -> dict[str, Json]:
        return {p["name"]: p["schema"] for p in schema["paths"][path]["get"]["parameters"]
                if p["in"] == "query"}

    assert params("/v1/chat/sessions") == {
        "limit": {"type": "integer", "minimum": 1, "maximum": 100},
        "offset": {"type": "integer", "minimum": 0, "maximum": 2147483647},
        "include_inactive": {"type": "boolean"},
        "q": {"type": "string", "maxLength": 1000},
        "model": {"type": "string"},
        "metadata.KEY": {"type": "string"},
        "after": {"type": "string"},
    }
    assert params("/v1/chat/sessions/{session_id}/messages") == {
        "limit": {"type": "integer", "minimum": 1, "maximum": 500},
        "offset": {"type": "integer", "minimum": 0, "maximum": 2147483647},
        "order": {"type": "string", "enum": ["asc", "desc"]},
        "after_seq": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        "before_seq": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    }
    assert params("/v1/chat/search") == {
        "q": {"type": "string", "maxLength": 1000},
        "limit": {"type": "integer", "minimum": 1, "maximum": 100},
        "offset": {"type": "integer", "minimum": 0, "maximum": 2147483647},
        "after": {"type": "string"},
        "session_id": {"type": "string"},
    }


async def test_the_interactive_page_and_a_schema_tool_can_use_it(
    client: Client, schema: Json
) -> None:
    page = await client.get("/schema")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "SwaggerUIBundle" in page.text
    # Offline: every asset the page loads is served by chatproxy itself.
    loaded_from = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert sorted(loaded_from) == ["/schema/assets/favicon-32x32.png",
                                   "/schema/assets/swagger-ui-bundle.js",
                                   "/schema/assets/swagger-ui-standalone-preset.js",
                                   "/schema/assets/swagger-ui.css"]
    for path in loaded_from:
        asset = await client.get(path)
        assert asset.status_code == 200 and len(asset.content) > 100, path
    assert "SwaggerUIBundle" in (await client.get("/schema/assets/swagger-ui-bundle.js")).text
    missing = await client.get("/schema/assets/index.html")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    loaded = schemathesis.openapi.from_dict(schema)
    results = [type(result).__name__ for result in loaded.get_all_operations()]
    assert results == ["Ok"] * (len(ROWS) + 4)  # no operation schemathesis cannot read


# --- what the server does agrees with it ------------------------------------------------------


async def test_answers_and_requests_agree_with_the_schema(
    client: Client, schema: Json, upstream: respx.Router, alice: User,
    admin_headers: dict[str, str],
) -> None:
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, json=completion("hello")))
    fields = {"session_name": "docs", "model": "gpt-4o", "system_prompt": None,
              "max_history_messages": 5, "max_history_tokens": 1000, "metadata": {"k": "v"}}
    assert body_validator(schema, "/v1/chat/sessions").is_valid(fields)
    created = await client.post("/v1/chat/sessions", headers=alice.headers, json=fields)
    assert created.status_code == 201
    check(schema, "Session", created.json())
    sid = created.json()["id"]

    turn = {"model": "gpt-4o", "session_id": sid, "messages": [u("hi")], "temperature": 0}
    assert body_validator(schema, "/v1/chat/completions").is_valid(turn)
    r = await client.post("/v1/chat/completions", headers=alice.headers, json=turn)
    assert r.status_code == 200
    documented = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["headers"]
    # those only when they apply: a replay, a request that resent stored messages, a summary
    # carried, an overflow retry
    assert {h.lower() for h in documented} - set(r.headers) == {
        "idempotent-replayed", "x-history-overlap", "x-history-summary-seq", "x-history-retried"}

    listed = await client.get("/v1/chat/sessions?include_inactive=true", headers=alice.headers)
    check(schema, "SessionList", listed.json())
    history = await client.get(f"/v1/chat/sessions/{sid}/messages", headers=alice.headers)
    check(schema, "MessageList", history.json())
    assert len(history.json()["data"]) == 2
    found = await client.get("/v1/chat/search?q=hel", headers=alice.headers)
    check(schema, "SearchList", found.json())
    assert len(found.json()["data"]) == 1

    exported = await client.get(f"/v1/chat/sessions/{sid}/export", headers=alice.headers)
    check(schema, "ExportDocument", exported.json())
    assert body_validator(schema, "/v1/chat/sessions/import").is_valid(exported.json())
    imported = await client.post("/v1/chat/sessions/import", headers=alice.headers,
                                 json=exported.json())
    assert imported.status_code == 201
    check(schema, "Session", imported.json())

    fork = {"up_to_seq": 1, "session_name": "fork"}
    assert body_validator(schema, "/v1/chat/sessions/{session_id}/fork").is_valid(fork)
    forked = await client.post(f"/v1/chat/sessions/{sid}/fork", headers=alice.headers, json=fork)
    check(schema, "Session", forked.json())
    merge = {"source_session_id": forked.json()["id"]}
    assert body_validator(schema, "/v1/chat/sessions/{session_id}/merge").is_valid(merge)
    merged = await client.post(f"/v1/chat/sessions/{sid}/merge", headers=alice.headers,
                               json=merge)
    check(schema, "Session", merged.json())

    user = await client.post("/admin/users", headers=admin_headers, json={"name": "docs-user"})
    check(schema, "User", user.json())
    key = await client.post(f"/admin/users/{user.json()['id']}/keys", headers=admin_headers,
                            json={"name": "laptop"})
    check(schema, "NewApiKey", key.json())
    keys = await client.get(f"/admin/users/{user.json()['id']}/keys", headers=admin_headers)
    check(schema, "ApiKeyList", keys.json())
    users = await client.get("/admin/users", headers=admin_headers)
    check(schema, "UserList", users.json())


async def test_responses_and_conversations_agree_with_the_schema(
    client: Client, schema: Json, upstream: respx.Router, alice: User
) -> None:
    upstream.post("/chat/completions").mock(return_value=httpx.Response(
        200, json=completion("hello")))
    create = {"items": [{"type": "message", "role": "user", "content": "hi"}],
              "metadata": {"k": "v"}}
    assert body_validator(schema, "/v1/conversations").is_valid(create)
    made = await client.post("/v1/conversations", headers=alice.headers, json=create)
    check(schema, "Conversation", made.json())
    cid = made.json()["id"]
    path = f"/v1/conversations/{cid}"
    update = {"metadata": {"k": "w"}}
    assert body_validator(schema, CONVERSATION).is_valid(update)
    check(schema, "Conversation",
          (await client.post(path, headers=alice.headers, json=update)).json())
    added = {"items": [{"role": "user", "content": "more"}]}
    assert body_validator(schema, CONVERSATION + "/items").is_valid(added)
    created = await client.post(path + "/items", headers=alice.headers, json=added)
    check(schema, "ItemList", created.json())
    check(schema, "ItemList", (await client.get(path + "/items", headers=alice.headers)).json())

    request = {"model": "gpt-4o", "input": "hi", "conversation": cid, "instructions": "x",
               "tools": [{"type": "function", "name": "f", "parameters": {}, "strict": False}],
               "text": {"format": {"type": "text"}}, "store": True, "temperature": 0.5}
    assert body_validator(schema, "/v1/responses").is_valid(request)
    answered = await client.post("/v1/responses", headers=alice.headers, json=request)
    check(schema, "ResponseObject", answered.json())
    rid = answered.json()["id"]
    check(schema, "ResponseObject",
          (await client.get(f"/v1/responses/{rid}", headers=alice.headers)).json())
    check(schema, "ItemList", (await client.get(f"/v1/responses/{rid}/input_items",
                                                headers=alice.headers)).json())
    check(schema, "DeletedResponse",
          (await client.delete(f"/v1/responses/{rid}", headers=alice.headers)).json())
    item = created.json()["data"][0]["id"]
    check(schema, "Conversation", (await client.delete(
        f"{path}/items/{item}", headers=alice.headers)).json())
    check(schema, "DeletedConversation",
          (await client.delete(path, headers=alice.headers)).json())
    for refused in ({"model": "gpt-4o", "input": "x", "colour": "red"},
                    {"model": "gpt-4o", "input": "x", "truncation": "sometimes"}):
        assert not body_validator(schema, "/v1/responses").is_valid(refused)
        r = await client.post("/v1/responses", headers=alice.headers, json=refused)
        assert r.status_code == 400
        check(schema, "ErrorResponse", r.json())


async def test_what_the_schema_refuses_the_server_refuses_with_the_envelope(
    client: Client, schema: Json, alice: User
) -> None:
    create = body_validator(schema, "/v1/chat/sessions")
    for body in ({"colour": "red"}, {"max_history_messages": 1001}, {"metadata": {"k": 1}},
                 {"session_name": 7}):
        assert not create.is_valid(body)
        r = await client.post("/v1/chat/sessions", headers=alice.headers, json=body)
        assert r.status_code == 400
        check(schema, "ErrorResponse", r.json())
    for r in (
        await client.get("/v1/chat/sessions/sess_nope", headers=alice.headers),
        await client.get("/v1/chat/sessions"),
        await client.get("/admin/users", headers=alice.headers),
    ):
        assert r.status_code in (401, 403, 404)
        check(schema, "ErrorResponse", r.json())
