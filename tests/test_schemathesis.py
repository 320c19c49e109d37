"""The app's own OpenAPI schema against a real `chatproxy serve`: no 500, no cross-user read.

Two tests:

- schemathesis' own runner (its CLI, as a user runs it) on every operation `GET
  /schema/openapi.json` lists, under both session prefixes, in its coverage phase (the edges of
  each schema: boundary values, wrong types, missing and extra fields, other methods) and its
  fuzzing phase, with a valid key and a share of real session ids (issue 13, item 13). Its
  checks: no server error, and every answer's status, content type, headers and body as the
  document says (but the chat route's body, below), schema-invalid input refused, auth not
  ignored. One of its checks is off:
  `positive_data_acceptance` (the document's JSON Schema takes `203.0` as an integer and says
  nothing of the rules between fields, such as `after_seq` with `before_seq`, which are 400s
  by design). Deterministic (a fixed seed, deterministic generation, no example
  database) and bounded (25 fuzzed cases per operation; about 2,500 requests, half a minute).
- hypothesis over the schema's operations with two users' keys (issue 5): what the schema does
  not describe (JSON bodies, the list query parameters), and a share of bob's calls aimed at
  alice's private session, which he must never read or change.
"""

from __future__ import annotations

import json
import subprocess
import sys
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



def test_coverage_and_fuzzing_phases_on_every_operation_find_nothing(
    fake: FakeUpstream, database_url: str, alice: User, tmp_path: Path
) -> None:
    admin_key = "admin-fuzz-" + "k" * 20
    env = serve_env(database_url, fake.base_url, tmp_path, CHATPROXY_UPSTREAM_TIMEOUT="2",
                    CHATPROXY_ADMIN_KEY=admin_key, CHATPROXY_LOG_LEVEL="warning")
    with serving(env, tmp_path / "serve.log") as server, httpx.Client(
        base_url=server.url, timeout=30
    ) as http:
        sessions = [new_session(http, alice, {"session_name": f"fuzz {i}"}) for i in range(6)]
        for sid in sessions[:3]:  # some history to fork, merge, export and page through
            r = http.post("/v1/chat/completions", headers=alice.headers, json={
                "model": "echo", "session_id": sid,
                "messages": [{"role": "user", "content": "hello"}]})
            assert r.status_code == 200, r.text
        schema = http.get("/schema/openapi.json").json()
        config = tmp_path / "schemathesis.toml"
        config.write_text(SCHEMATHESIS_CONFIG.format(sessions=json.dumps(sessions)))
        # The admin API last, on its own: among what it fuzzes is revoking keys, alice's too.
        users = run_schemathesis(server, config, tmp_path / "users", "--exclude-path-regex",
                                 "^/admin", "-H", f"Authorization: Bearer {alice.key}")
        admin = run_schemathesis(server, config, tmp_path / "admin", "--include-path-regex",
                                 "^/admin", "-H", f"Authorization: Bearer {admin_key}")
    operations = {f"{method.upper()} {path}" for path, item in schema["paths"].items()
                  for method in item if method in ("get", "put", "post", "patch", "delete")}
    assert {"GET /v1/chat/sessions/{session_id}", "GET /chat/sessions/{session_id}",
            "POST /v1/chat/completions", "POST /admin/users"} <= operations
    for phase in ("coverage", "fuzzing"):
        assert users[phase] | admin[phase] == operations, phase
    log = server.log()
    assert "Traceback" not in log and '"status": 500' not in log


# What both runs share; each gives its own key and operations on the command line.
SCHEMATHESIS_CONFIG = """
seed = 42
request-timeout = 10
[generation]
deterministic = true
database = "none"
max-examples = 25
[cache]
enabled = false
[checks.positive_data_acceptance]
enabled = false
[dictionaries.sessions]
values = {sessions}
[parameters]
"path.session_id" = {{ dictionary = "sessions", probability = 0.7 }}
"body.source_session_id" = {{ dictionary = "sessions", probability = 0.7 }}
# The chat route's event stream is documented as one string (OpenAPI 3.1 has no schema for an
# event); schemathesis reads such a schema as each event's, so the body is not checked there.
[[operations]]
include-name = "POST /v1/chat/completions"
checks.response_schema_conformance.enabled = false
"""


def run_schemathesis(server: Any, config: Path, reports: Path, *options: str
                     ) -> dict[str, set[str]]:
    """`schemathesis run` over the served schema; the operations each phase passed."""
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
         server.url + "/schema/openapi.json", "--phases", "coverage,fuzzing", "--workers", "1",
         "--report", "ndjson", "--report-dir", str(reports), *options],
        capture_output=True, text=True, cwd=config.parent, timeout=600)
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    passed: dict[str, set[str]] = {"coverage": set(), "fuzzing": set()}
    for report in reports.glob("*.ndjson"):
        for line in report.read_text().splitlines():
            event = json.loads(line).get("ScenarioFinished")
            if event and event["phase"] in passed:
                assert event["status"] == "success", event
                passed[event["phase"]].add(event["recorder"]["label"])
    return passed
