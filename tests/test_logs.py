"""JSON logs: one access line per request (error paths included), request ids in and out, no
key or message text; and the real `chatproxy serve --workers 2` logging JSON and adding up its
workers' metrics."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from proxy import logs, metrics
from tests.conftest import ROOT
from tests.fault_helpers import free_port
from tests.test_metrics import parse, value

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ACCESS_FIELDS = {
    "ts", "level", "logger", "msg", "method", "route", "status", "duration_ms", "user_id",
    "session_id", "request_id", "upstream", "upstream_status", "upstream_latency_ms",
}


def access_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line["logger"] == "chatproxy.access"]


def without_timing(line: dict[str, Any]) -> dict[str, Any]:
    assert set(line) == ACCESS_FIELDS
    assert TS.match(line["ts"]), line["ts"]
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["msg"] == (
        f"{line['method']} {line['route'] or 'unmatched'} {line['status']} {line['duration_ms']}ms"
    )
    return {k: v for k, v in line.items() if k not in ("ts", "duration_ms", "msg")}


def access(method: str, route: str | None, status: int, request_id: str,
           user_id: str | None = None) -> dict[str, Any]:
    return {
        "level": "info", "logger": "chatproxy.access", "method": method, "route": route,
        "status": status, "user_id": user_id, "session_id": None, "request_id": request_id,
        "upstream": None, "upstream_status": None, "upstream_latency_ms": None,
    }


async def test_error_paths_log_one_json_line_each(client, alice, captured) -> None:
    bad_key = "sk-cp-" + "k" * 43
    unauthorized = await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {bad_key}", "X-Request-Id": "req-401.test"},
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "msg-text-e41c"}]},
    )
    assert unauthorized.status_code == 401
    assert unauthorized.headers["x-request-id"] == "req-401.test"
    missing = await client.get("/v1/chat/sessions/sess_missing",
                               headers={**alice.headers, "X-Request-Id": "not valid"})
    assert missing.status_code == 404
    generated = missing.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    unknown = await client.get("/no/such/route", headers={"X-Request-Id": "x" * 129})
    assert unknown.status_code == 404
    assert unknown.headers["x-request-id"] != "x" * 129

    lines = access_lines(captured)
    assert [without_timing(line) for line in lines] == [
        access("POST", "/v1/chat/completions", 401, "req-401.test"),
        access("GET", "/v1/chat/sessions/{session_id}", 404, generated, user_id=alice.id),
        access("GET", None, 404, unknown.headers["x-request-id"]),
    ]
    text = captured.getvalue()
    for secret in (bad_key, alice.key, alice.name, "msg-text-e41c", "/no/such/route",
                   "sess_missing"):
        assert secret not in text


async def test_an_unhandled_error_logs_its_traceback_with_the_request_id(
    client, captured, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.routes import health

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("internal detail")

    # /ready reaches the pool through db.connection: make that blow up.
    monkeypatch.setattr(health.db, "connection", boom)
    response = await client.get("/ready", headers={"X-Request-Id": "req-500"})
    assert response.status_code == 500
    assert "internal detail" not in response.text
    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    error = next(line for line in lines if line["level"] == "error")
    assert error["request_id"] == "req-500"
    assert "RuntimeError: internal detail" in error["exc"]
    assert without_timing(access_lines(captured)[-1]) == access("GET", "/ready", 500, "req-500")


async def test_session_and_upstream_fields_are_logged_once_known(
    client, upstream, alice, captured
) -> None:
    upstream.post("/chat/completions").mock(side_effect=[
        httpx.Response(200, json={"choices": [{"index": 0, "message": {
            "role": "assistant", "content": "reply-text-0c4e"}}]}),
        httpx.Response(429, json={"error": {"message": "slow down"}}),
        httpx.ConnectError("refused"),
    ])
    created = await client.post("/v1/chat/sessions", headers={**alice.headers,
                                "X-Request-Id": "r-create"}, json={})
    sid = created.json()["id"]
    for rid in ("r-turn", "r-429", "r-down"):
        await client.post("/v1/chat/completions", headers={**alice.headers, "X-Request-Id": rid},
                          json={"model": "gpt-4o", "session_id": sid,
                                "messages": [{"role": "user", "content": "msg-text-5a1d"}]})
    await client.get(f"/v1/chat/sessions/{sid}", headers={**alice.headers, "X-Request-Id": "r-get"})

    lines = access_lines(captured)
    latencies = [line.pop("upstream_latency_ms") for line in lines]
    assert [isinstance(ms, float) and ms >= 0 for ms in latencies] == [
        False, True, True, False, False]
    for line in lines:
        line["upstream_latency_ms"] = None

    def turn(status: int, rid: str, upstream_status: int | None) -> dict[str, Any]:
        line = access("POST", "/v1/chat/completions", status, rid, user_id=alice.id)
        line["session_id"] = sid
        if upstream_status is not None:
            line.update(upstream="default", upstream_status=upstream_status)
        return line

    assert [without_timing(line) for line in lines] == [
        {**access("POST", "/v1/chat/sessions", 201, "r-create", alice.id), "session_id": sid},
        turn(200, "r-turn", 200),
        turn(429, "r-429", 429),
        turn(502, "r-down", None),  # a transport failure has no upstream status
        {**access("GET", "/v1/chat/sessions/{session_id}", 200, "r-get", alice.id),
         "session_id": sid},
    ]
    for secret in (alice.key, "msg-text-5a1d", "reply-text-0c4e"):
        assert secret not in captured.getvalue()


def test_formatter_writes_extras_and_survives_unencodable_text() -> None:
    record = logging.LogRecord("chatproxy.x", logging.WARNING, __file__, 1, "a %s b", ("\ud800",),
                               None)
    record.upstream = "local"
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    line.encode("utf-8")  # a lone surrogate is escaped, never written raw
    parsed = json.loads(line)
    assert TS.match(parsed.pop("ts"))
    assert parsed == {"level": "warning", "logger": "chatproxy.x", "msg": "a \ud800 b",
                      "upstream": "local"}


def test_uvicorn_lines_go_through_the_json_config() -> None:
    script = (
        "import logging, logging.config\n"
        "from proxy import logs\n"
        "logging.config.dictConfig(logs.config('info'))\n"
        "logging.getLogger('uvicorn.error').info('Started server process [%d]', 7,"
        " extra={'color_message': 'coloured'})\n"
        "logging.getLogger('httpx').info('HTTP Request: noisy')\n"
        "logging.getLogger('chatproxy').debug('below the level')\n"
        "logging.getLogger('chatproxy').warning('kept')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    for line in lines:
        assert TS.match(line.pop("ts"))
    assert lines == [
        {"level": "info", "logger": "uvicorn.error", "msg": "Started server process [7]"},
        {"level": "warning", "logger": "chatproxy", "msg": "kept"},
    ]
    assert done.stdout == ""


# --- the real server ----------------------------------------------------------------------------


def with_password(url: str) -> tuple[str, str]:
    """`url` with a password (the embedded server trusts local connections and ignores it)."""
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    user, _, host = parts.netloc.rpartition("@")
    user = user.split(":", 1)[0] or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:e2e-db-secret-77@{host}")), "e2e-db-secret-77"


@pytest.mark.e2e
def test_serve_with_two_workers_logs_json_and_adds_up_metrics(
    database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    url, password = with_password(database_url)
    env = {k: v for k, v in os.environ.items() if k != metrics.ENV and k != "OPENAI_API_KEY"}
    env.update({
        "CHATPROXY_DATABASE_URL": url,
        "CHATPROXY_PORT": str(port),
        "CHATPROXY_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1",
        "CHATPROXY_MODELS_FILE": str(ROOT / "config" / "models.toml"),
        "CHATPROXY_DB_POOL_SIZE": "2",
        "CHATPROXY_SHUTDOWN_GRACE": "1",
        "CHATPROXY_LOG_LEVEL": "info",
        "TMPDIR": str(tmp_path),
    })
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--workers", "2"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, stderr_path.read_text()
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        assert list(tmp_path.glob("chatproxy-metrics-*"))  # the private multiprocess directory
        for index in range(6):
            response = httpx.get(base + "/v1/chat/sessions",
                                 headers={"X-Request-Id": f"e2e-{index}"}, timeout=10)
            assert response.status_code == 401
            assert response.headers["x-request-id"] == f"e2e-{index}"
        scraped = httpx.get(base + "/metrics", timeout=10)
        assert scraped.status_code == 200
        samples = parse(scraped.text)
        assert value(samples, "chatproxy_requests_total", route="/v1/chat/sessions",
                     method="GET", status="401") == 6
        assert value(samples, "chatproxy_db_pool_max") in (2, 4)  # one or both workers' pools
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    text = stderr_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(set(line) >= {"ts", "level", "logger", "msg"} for line in lines)
    messages = [(line["logger"], line["msg"]) for line in lines]
    assert ("uvicorn.error", "Application startup complete.") in messages
    assert any(logger == "chatproxy" and msg.startswith("database: external PostgreSQL at ")
               for logger, msg in messages)
    assert ("chatproxy", "upstream default: http://127.0.0.1:9/v1") in messages
    served = [line for line in lines if line["logger"] == "chatproxy.access"
              and line["route"] == "/v1/chat/sessions"]
    assert sorted(line["request_id"] for line in served) == [f"e2e-{i}" for i in range(6)]
    assert {line["status"] for line in served} == {401}
    assert password not in text
    assert not list(tmp_path.glob("chatproxy-metrics-*"))  # removed when the server stopped
