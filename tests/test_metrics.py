"""`/metrics`: counters move with requests, pool gauges are live, nothing identifies a caller;
several worker processes add up through the multiprocess directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from prometheus_client.parser import text_string_to_metric_families

from proxy import metrics
from tests.conftest import ADMIN_KEY, ROOT, UPSTREAM_KEY
from tests.turns import completion

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: Any) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(response.text)



async def test_request_counters_move_by_route_template_method_and_status(client, alice) -> None:
    before = await scrape(client)
    for _ in range(2):
        assert (await client.get("/v1/chat/sessions", headers=alice.headers)).status_code == 200
    missing = await client.get("/v1/chat/sessions/sess_nope", headers=alice.headers)
    assert missing.status_code == 404
    assert (await client.get("/v1/chat/sessions")).status_code == 401
    assert (await client.get("/no/such/route")).status_code == 404
    assert (await client.delete("/health")).status_code == 405
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    total = "chatproxy_requests_total"
    assert moved(total, route="/v1/chat/sessions", method="GET", status="200") == 2
    assert moved(total, route="/v1/chat/sessions", method="GET", status="401") == 1
    assert moved(total, route="/v1/chat/sessions/{session_id}", method="GET", status="404") == 1
    assert moved(total, route="unmatched", method="GET", status="404") == 1
    assert moved(total, route="unmatched", method="DELETE", status="405") == 1
    assert moved(total, route="/metrics", method="GET", status="200") == 1  # the first scrape
    duration = "chatproxy_request_duration_seconds_count"
    assert moved(duration, route="/v1/chat/sessions", method="GET") == 3
    assert moved(duration, route="unmatched", method="GET") == 1


async def test_every_metric_is_listed_before_anything_happened(client) -> None:
    text = (await client.get("/metrics")).text
    families = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "chatproxy_requests",
        "chatproxy_request_duration_seconds",
        "chatproxy_upstream_duration_seconds",
        "chatproxy_stream_ttfb_seconds",
        "chatproxy_history_messages_injected",
        "chatproxy_history_tokens_injected",
        "chatproxy_history_messages_dropped",
        "chatproxy_turns_stored",
        "chatproxy_idempotent_replays",
        "chatproxy_db_pool_size",
        "chatproxy_db_pool_in_use",
        "chatproxy_db_pool_max",
        "chatproxy_retention_deleted_sessions",
        "chatproxy_retention_deleted_messages",
    } <= families


async def test_pool_gauges_are_read_from_the_pool_at_scrape_time(client, settings) -> None:
    pool = client.app.state.rt.pool
    portal = client.blocking_portal  # the app (and its pool) runs on the portal's event loop

    async def acquire_two() -> list[Any]:
        return [await pool.acquire(), await pool.acquire()]

    async def release(conns: list[Any]) -> None:
        for conn in conns:
            pool.release(conn)

    def lent_out() -> int:
        return pool.get_size() - pool.get_idle_size()

    idle = await scrape(client)
    assert value(idle, "chatproxy_db_pool_max") == settings.db_pool_size
    assert value(idle, "chatproxy_db_pool_in_use") == lent_out()
    conns = portal.call(acquire_two)
    try:
        held = await scrape(client)
    finally:
        portal.call(release, conns)
    assert value(held, "chatproxy_db_pool_in_use") == lent_out() + 2
    assert 2 <= value(held, "chatproxy_db_pool_size") <= settings.db_pool_size
    released = await scrape(client)
    assert value(released, "chatproxy_db_pool_in_use") == lent_out()


async def test_recording_functions_move_their_metrics(client) -> None:
    before = await scrape(client)
    metrics.turn_stored("complete")
    metrics.turn_stored("incomplete")
    metrics.turn_stored("incomplete")
    metrics.replay()
    metrics.history(injected=4, tokens=1234, dropped=3)
    metrics.upstream_latency(0.2, 200, upstream="local")
    metrics.stream_ttfb(0.05, upstream="local")
    metrics.retention_deleted(sessions=2, messages=17)
    metrics.retention_deleted(sessions=0, messages=0)
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("chatproxy_turns_stored_total", status="complete") == 1
    assert moved("chatproxy_turns_stored_total", status="incomplete") == 2
    assert moved("chatproxy_idempotent_replays_total") == 1
    assert moved("chatproxy_history_messages_injected_sum") == 4
    assert moved("chatproxy_history_tokens_injected_sum") == 1234
    assert moved("chatproxy_history_messages_dropped_sum") == 3
    assert moved("chatproxy_history_messages_dropped_count") == 1
    assert moved("chatproxy_upstream_duration_seconds_count", upstream="local", status="200") == 1
    assert moved("chatproxy_stream_ttfb_seconds_count", upstream="local") == 1
    assert moved("chatproxy_retention_deleted_sessions_total") == 2
    assert moved("chatproxy_retention_deleted_messages_total") == 17


async def test_no_key_user_name_path_or_message_text_in_the_output(
    client, upstream: respx.Router, alice, admin_headers
) -> None:
    upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion("the-reply-text-7c1f"))
    )
    upstream.get("/models/raw-path-value-91ab").mock(return_value=httpx.Response(200, json={}))
    created = await client.post("/v1/chat/sessions", headers=alice.headers,
                                json={"session_name": "session-name-5e2d"})
    sid = created.json()["id"]
    turn = await client.post("/v1/chat/completions", headers=alice.headers, json={
        "model": "gpt-4o", "session_id": sid,
        "messages": [{"role": "user", "content": "the-message-text-3b9a"}]})
    assert turn.status_code == 200, turn.text
    assert (await client.get("/v1/models/raw-path-value-91ab",
                             headers=alice.headers)).status_code == 200
    user = await client.post("/admin/users", headers=admin_headers,
                             json={"name": "admin-made-user-4d0e"})
    assert user.status_code == 201
    await client.get("/v1/chat/sessions", headers={"Authorization": "Bearer sk-cp-wrong-key-0a1b"})

    text = (await client.get("/metrics")).text
    assert 'route="/v1/{path}"' in text
    for secret in (
        alice.key, alice.name, alice.id, sid, UPSTREAM_KEY, ADMIN_KEY, "sk-cp-wrong-key-0a1b",
        "session-name-5e2d", "the-message-text-3b9a", "the-reply-text-7c1f",
        "raw-path-value-91ab", "admin-made-user-4d0e", user.json()["id"],
    ):
        assert secret not in text


class Breaking(httpx.AsyncByteStream):
    """A stream body that sends `head` and then breaks off."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    async def __aiter__(self) -> Any:
        yield self.head
        raise httpx.ReadError("connection reset")


def sse(*contents: str, done: bool = True) -> bytes:
    events = [
        b'data: {"choices":[{"index":0,"delta":{"content":' + json.dumps(c).encode() + b"}}]}\n\n"
        for c in contents
    ]
    return b"".join(events) + (b"data: [DONE]\n\n" if done else b"")


async def test_turns_move_the_turn_history_upstream_and_ttfb_metrics(
    client, upstream: respx.Router, alice
) -> None:
    stream = {"content-type": "text/event-stream"}
    upstream.post("/chat/completions").mock(side_effect=[
        httpx.Response(200, json=completion("one")),  # turn 1: 0 history messages
        httpx.Response(200, json=completion("two")),  # turn 2: 2
        httpx.Response(200, headers=stream, content=sse("th", "ree")),  # turn 3: 4
        httpx.Response(200, headers=stream, stream=Breaking(sse("fo", done=False))),  # 6
        httpx.Response(500, json={"error": {"message": "boom"}}),  # 8, nothing stored
        httpx.ConnectError("refused"),  # 8, no upstream status: no upstream latency
        httpx.Response(200, headers=stream, content=sse("five")),  # no session
    ])
    before = await scrape(client)
    sid = (await client.post("/v1/chat/sessions", headers=alice.headers, json={})).json()["id"]
    statuses, tokens = [], 0
    for index in range(6):
        r = await client.post("/v1/chat/completions", headers=alice.headers, json={
            "model": "gpt-4o", "session_id": sid, "stream": index in (2, 3),
            "messages": [{"role": "user", "content": f"u{index}"}]})
        statuses.append(r.status_code)
        tokens += int(r.headers.get("x-history-tokens", 0))
    # The two failed turns injected the whole session as it stood after turn 4.
    session = (await client.get(f"/v1/chat/sessions/{sid}", headers=alice.headers)).json()
    tokens += 2 * session["total_tokens"]
    r = await client.post("/v1/chat/completions", headers=alice.headers, json={
        "model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    statuses.append(r.status_code)
    assert statuses == [200, 200, 200, 200, 500, 502, 200]
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("chatproxy_turns_stored_total", status="complete") == 3
    assert moved("chatproxy_turns_stored_total", status="incomplete") == 1
    assert moved("chatproxy_history_messages_injected_count") == 6
    assert moved("chatproxy_history_messages_injected_sum") == 0 + 2 + 4 + 6 + 8 + 8
    assert moved("chatproxy_history_messages_dropped_sum") == 0
    assert moved("chatproxy_history_tokens_injected_count") == 6
    assert moved("chatproxy_history_tokens_injected_sum") == tokens
    upstream_count = "chatproxy_upstream_duration_seconds_count"
    assert moved(upstream_count, upstream="default", status="200") == 5
    assert moved(upstream_count, upstream="default", status="500") == 1
    assert moved("chatproxy_stream_ttfb_seconds_count", upstream="default") == 3


# --- several processes ------------------------------------------------------------------------

WORKER = """
import sys
from proxy import metrics

class Pool:
    def __init__(self, size, idle):
        self.size, self.idle = size, idle
    def get_size(self): return self.size
    def get_idle_size(self): return self.idle
    def get_max_size(self): return 10

for status in sys.argv[1].split(","):
    metrics.turn_stored(status)
metrics.observe_pool(Pool(int(sys.argv[2]), int(sys.argv[3])))
if sys.argv[4] == "replay":
    metrics.replay()
if sys.argv[5] == "render":
    sys.stdout.write(metrics.render().decode())
"""


def run_worker(directory: Path, *args: str) -> str:
    env = {**os.environ, metrics.ENV: str(directory)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WORKER), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    return done.stdout


def test_workers_add_up_and_a_dead_workers_pool_gauges_are_dropped(tmp_path: Path) -> None:
    # The first worker exits without cleaning up (as a crash would); its counters stay,
    # its live pool gauges must not.
    run_worker(tmp_path, "complete,complete", "3", "1", "replay", "-")
    samples = parse(run_worker(tmp_path, "incomplete", "2", "0", "-", "render"))
    assert value(samples, "chatproxy_turns_stored_total", status="complete") == 2
    assert value(samples, "chatproxy_turns_stored_total", status="incomplete") == 1
    assert value(samples, "chatproxy_idempotent_replays_total") == 1
    assert value(samples, "chatproxy_db_pool_size") == 2
    assert value(samples, "chatproxy_db_pool_in_use") == 2
    assert value(samples, "chatproxy_db_pool_max") == 10


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_serve_with_several_workers_gets_a_fresh_private_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv(metrics.ENV, "/operator/choice")
    stale = tmp_path / f"chatproxy-metrics-{dead_pid()}-abc123"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"old")
    live = tmp_path / f"chatproxy-metrics-{os.getpid()}-def456"
    live.mkdir()

    with metrics.multiprocess_dir(1) as none:
        assert none is None
        assert os.environ[metrics.ENV] == "/operator/choice"
    with metrics.multiprocess_dir(4) as path:
        assert path is not None
        assert os.environ[metrics.ENV] == str(path)
        assert path.parent == tmp_path and path.is_dir()
        assert list(path.iterdir()) == []
        assert path.stat().st_mode & 0o777 == 0o700
        assert not stale.exists()
        assert live.is_dir()
    assert not path.exists()
    assert os.environ[metrics.ENV] == "/operator/choice"
