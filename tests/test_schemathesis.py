"""The app's own OpenAPI schema, fuzzed with two users' keys (issue 5): no 500, no cross-user read.

Schemathesis draws every operation `GET /schema/openapi.json` lists from a real `chatproxy serve`;
the test adds what the schema does not describe (JSON bodies, the list query parameters) and
aims a share of bob's calls at alice's private session. Bounded: a few hundred calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import User
from tests.fault_helpers import FakeUpstream, serve_env, serving

pytestmark = pytest.mark.e2e

SECRET = "alice-private-text-7f3a"
KEYS = ["session_name", "model", "system_prompt", "max_history_messages", "max_history_tokens",
        "metadata", "up_to_seq", "source_session_id", "format", "session", "messages", "role",
        "content", "stream", "session_id", "input", "items", "conversation", "type", "call_id",
        "output", "instructions", "tools", "previous_response_id"]
SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**63)
           | st.floats(allow_nan=False) | st.text(max_size=12))
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
QUERY = st.dictionaries(
    st.sampled_from(["limit", "offset", "order", "include_inactive"]),
    st.sampled_from(["asc", "desc", "true", "false", "0", "1", "-1", "500", "99999999999"])
    | st.text(max_size=6),
    max_size=3,
)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def test_fuzzing_the_schema_finds_no_500_and_no_cross_user_read(
    fake: FakeUpstream, database_url: str, alice: User, bob: User, tmp_path: Path
) -> None:
    env = serve_env(database_url, fake.base_url, tmp_path, CHATPROXY_UPSTREAM_TIMEOUT="2",
                    CHATPROXY_ADMIN_KEY="admin-fuzz-" + "k" * 20)
    with serving(env, tmp_path / "serve.log") as server, httpx.Client(
        base_url=server.url, timeout=30
    ) as http:
        private = new_session(http, alice, {"session_name": SECRET, "system_prompt": SECRET})
        turn = http.post("/v1/chat/completions", headers=alice.headers, json={
            "model": "echo", "session_id": private,
            "messages": [{"role": "user", "content": SECRET}]})
        assert turn.status_code == 200, turn.text
        targets = {"alice": new_session(http, alice, {}), "bob": new_session(http, bob, {}),
                   "alice-private": private}
        schema = schemathesis.openapi.from_url(server.url + "/schema/openapi.json")
        seen: dict[str, set[int]] = {}

        @settings(max_examples=300, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(), caller=st.sampled_from(["alice", "bob"]),
               target=st.sampled_from([None, "own", "alice-private"]), body=st.none() | JSON,
               query=QUERY)
        def call(case: Any, caller: str, target: str | None, body: Any,
                 query: dict[str, str]) -> None:
            user = alice if caller == "alice" else bob
            aim = target if target != "own" else caller
            if caller == "alice" and aim == "alice-private":
                aim = "alice"  # alice's own fuzzing leaves the private session alone
            for name in ("session_id", "conversation_id"):  # a conversation is a session
                if aim is not None and name in (case.path_parameters or {}):
                    case.path_parameters[name] = targets[aim]
            for name in ("source_session_id", "conversation"):
                if aim is not None and isinstance(body, dict) and name in body:
                    body[name] = targets[aim]
            kwargs: dict[str, Any] = {"params": query, "headers": user.headers}
            if case.method in ("POST", "PUT", "PATCH") and body is not None:
                kwargs["content"] = json.dumps(body)
                kwargs["headers"] = {**user.headers, "content-type": "application/json"}
            r = http.request(case.method, case.formatted_path, **kwargs)
            seen.setdefault(f"{case.method} {case.path}", set()).add(r.status_code)
            assert r.status_code != 500, (case.method, case.formatted_path, body, r.text)
            assert r.status_code < 500 or r.json()["error"]["code"] in (
                "upstream_error", "upstream_timeout", "database_unavailable")
            if caller == "bob":
                assert SECRET not in r.text, (case.method, case.formatted_path, body)
                if aim == "alice-private" and (
                    "{session_id}" in case.path or "{conversation_id}" in case.path
                    or (isinstance(body, dict) and "conversation" in body)
                ):
                    assert not 200 <= r.status_code < 300, (case.method, case.formatted_path)

        call()
        assert len(seen) >= 20, sorted(seen)  # most operations were reached

        # Alice's private session is as it was.
        r = http.get(f"/v1/chat/sessions/{private}", headers=alice.headers)
        assert r.status_code == 200
        assert (r.json()["is_active"], r.json()["session_name"]) == (True, SECRET)
        r = http.get(f"/v1/chat/sessions/{private}/messages", headers=alice.headers)
        assert [m["content"] for m in r.json()["data"]] == [SECRET, f"reply to {SECRET}"]
    assert "Traceback" not in server.log()


def new_session(http: httpx.Client, user: User, body: dict[str, Any]) -> str:
    r = http.post("/v1/chat/sessions", json=body, headers=user.headers)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid
