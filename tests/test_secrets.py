"""No key and no message text in any log line or error body (issue 5, item 7).

A real `chatproxy serve` at log level debug is driven through every error path the proxy has
(and a few successes); then its whole stdout and stderr, and every error body it answered, are
searched for the client key, a key the admin API issued, the admin key, the upstream key and the
text of the messages.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import User
from tests.fault_helpers import FakeUpstream, free_port, serve_env, serving

pytestmark = pytest.mark.e2e

ADMIN = "admin-" + secrets.token_urlsafe(24)
UPSTREAM_SECRET = "sk-upstream-" + secrets.token_urlsafe(24)
TEXT = "confidential-" + secrets.token_hex(8)  # in every message the test sends
ISSUED = 7  # the answer that carries the key the admin API issued


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def config(tmp: Path, fake: FakeUpstream) -> dict[str, str]:
    """A second upstream for `dead*` models, on a port nobody listens on (502)."""
    toml = tmp / "upstreams.toml"
    toml.write_text(
        "[[upstreams]]\n"
        'name = "dead"\n'
        f'base_url = "http://127.0.0.1:{free_port()}/v1"\n'
        'api_key_env = "DEAD_UPSTREAM_KEY"\n'
        'models = ["dead*"]\n'
    )
    return {"CHATPROXY_CONFIG": str(toml), "DEAD_UPSTREAM_KEY": UPSTREAM_SECRET}


async def drive_every_error_path(url: str, alice: User) -> tuple[list[httpx.Response], str]:
    """Every kind of failure (and a few successes); returns the answers and the issued key."""
    answers: list[httpx.Response] = []
    me = alice.headers
    admin = {"Authorization": f"Bearer {ADMIN}"}
    message = [{"role": "user", "content": f"{TEXT} user says"}]
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:

        async def go(method: str, path: str, **kw: Any) -> httpx.Response:
            r = await c.request(method, path, **kw)
            answers.append(r)
            return r

        # Keys: missing, malformed, unknown, revoked-looking, user key on admin, bad admin key.
        await go("GET", "/v1/chat/sessions")
        await go("GET", "/v1/chat/sessions", headers={"Authorization": f"Bearer {TEXT}"})
        await go("GET", "/v1/chat/sessions", headers={"Authorization": "Bearer sk-cp-" + "q" * 43})
        await go("GET", "/v1/chat/sessions", headers={"Authorization": alice.key})  # no scheme
        await go("GET", "/admin/users", headers=me)
        await go("GET", "/admin/users", headers={"Authorization": f"Bearer {ADMIN}x"})
        # The admin API issues a key (it is in that one body, nowhere else), then revokes it.
        user = await go("POST", "/admin/users", json={"name": "secrets-" + secrets.token_hex(4)},
                        headers=admin)
        assert len(answers) == ISSUED
        issued = await go("POST", f"/admin/users/{user.json()['id']}/keys",
                          json={"name": "label"}, headers=admin)
        new_key = issued.json()["key"]
        await go("GET", "/v1/chat/sessions", headers={"Authorization": f"Bearer {new_key}"})
        await go("DELETE", f"/admin/keys/{issued.json()['id']}", headers=admin)
        await go("GET", "/v1/chat/sessions", headers={"Authorization": f"Bearer {new_key}"})
        await go("POST", "/admin/users", json={"name": user.json()["name"]}, headers=admin)
        # Bad input, with message text in it.
        sid = (await go("POST", "/v1/chat/sessions", json={
            "session_name": TEXT, "system_prompt": TEXT, "metadata": {"k": TEXT}},
            headers=me)).json()["id"]
        await go("POST", "/v1/chat/sessions", json={"bogus": TEXT}, headers=me)
        await go("POST", "/v1/chat/sessions", json={"session_name": [TEXT]}, headers=me)
        await go("POST", "/v1/chat/completions", content=f'{{"messages": "{TEXT}', headers=me)
        await go("POST", "/v1/chat/completions", headers=me,
                 json={"model": "echo", "messages": [{"role": TEXT, "content": TEXT}]})
        await go("POST", "/v1/chat/completions", headers=me,
                 json={"model": "echo", "session_id": TEXT, "messages": message})
        await go("POST", "/v1/chat/completions", headers={**me, "x-session-id": sid},
                 json={"model": "echo", "session_id": "sess_other", "messages": message})
        await go("POST", "/v1/chat/completions", headers=me, content=b"x" * 5000)
        await go("POST", "/v1/chat/completions", headers=me, json={
            "model": "echo", "messages": [{"role": "user", "content": TEXT * 400}]})
        await go("GET", f"/v1/chat/sessions/{sid}/messages?limit={TEXT}", headers=me)
        await go("GET", "/v1/chat/sessions/sess_unknown", headers=me)
        await go("GET", "/v1/chat/sessions/a%00b", headers=me)
        await go("GET", "/nowhere", headers=me)
        await go("PATCH", "/health", headers=me)
        # Turns that work, streamed and not, with and without a session.
        for stream in (False, True):
            await go("POST", "/v1/chat/completions", headers=me,
                     json={"model": "echo", "session_id": sid, "stream": stream,
                           "messages": message})
            await go("POST", "/v1/chat/completions", headers=me,
                     json={"model": "echo", "stream": stream, "messages": message})
        await go("GET", f"/v1/chat/sessions/{sid}/messages", headers=me)
        # Upstream failures: its own error passed through, unreachable (502), silent (504).
        for model in ("status:401", "status:429", "status:500", "dead-model", "hang"):
            for stream in (False, True):
                await go("POST", "/v1/chat/completions", headers=me,
                         json={"model": model, "session_id": sid, "stream": stream,
                               "messages": message})
        await go("GET", "/v1/models", headers=me)
        # A pool of one with no wait: a burst of session reads meets 503s.
        await asyncio.gather(*(go("GET", f"/v1/chat/sessions/{sid}", headers=me)
                               for _ in range(20)))
    return answers, new_key


async def test_no_secret_or_message_text_in_logs_or_error_bodies(
    fake: FakeUpstream, database_url: str, alice: User, tmp_path: Path
) -> None:
    env = serve_env(database_url, fake.base_url, tmp_path)
    env.update(config(tmp_path, fake))
    env.update({
        "CHATPROXY_LOG_LEVEL": "debug", "CHATPROXY_ADMIN_KEY": ADMIN,
        "CHATPROXY_UPSTREAM_API_KEY": UPSTREAM_SECRET, "CHATPROXY_UPSTREAM_TIMEOUT": "1",
        "CHATPROXY_MAX_BODY_BYTES": "4096", "CHATPROXY_DB_POOL_SIZE": "1",
        "CHATPROXY_DB_ACQUIRE_TIMEOUT": "0.01",
    })
    with serving(env, tmp_path / "serve.log") as server:
        answers, new_key = await drive_every_error_path(server.url, alice)
    statuses = {r.status_code for r in answers}
    # Every error class the proxy answers with was met (503 needs a lucky burst).
    assert {200, 201, 204, 400, 401, 403, 404, 405, 409, 413, 429, 500, 502, 504} <= statuses
    log = server.log()
    assert "GET /v1/chat/sessions" in log  # the log did capture the traffic
    upstream_headers = [h for h, _ in fake.requests]
    assert upstream_headers and all(
        h.get("authorization") == f"Bearer {UPSTREAM_SECRET}" for h in upstream_headers)

    secrets_ = {
        "client key": alice.key, "client key body": alice.key[12:],
        "issued key": new_key, "issued key body": new_key[12:],
        "admin key": ADMIN, "upstream key": UPSTREAM_SECRET, "message text": TEXT,
    }
    for name, value in secrets_.items():
        assert value not in log, f"{name} in the server's output"
    for r in answers:
        shown = {**secrets_}
        if r is not answers[ISSUED]:
            assert new_key not in r.text
        if r.status_code >= 400:
            for name, value in shown.items():
                assert value not in r.text, f"{name} in a {r.status_code} body: {r.text[:200]}"
        assert alice.key not in r.text and ADMIN not in r.text and UPSTREAM_SECRET not in r.text
