"""The real `chatproxy serve` on the embedded PostgreSQL: over HTTP, stopped, restarted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fault_helpers import cluster_running, free_port, scratch_dir

ROOT = Path(__file__).resolve().parent.parent
CHATPROXY = str(Path(sys.executable).parent / "chatproxy")


class Server:
    def __init__(self, env: dict[str, str], port: int, log: Path, *args: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [CHATPROXY, "serve", "--port", str(port), *args], env=env, cwd=ROOT, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + 120  # the first start runs initdb
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                r = httpx.get(self.url + "/health", timeout=1)
                if r.status_code == 200:
                    assert r.json() == {"status": "ok"}
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("chatproxy serve never became healthy:\n"
                             + self.log.read_text()[-3000:])

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def root() -> Iterator[Path]:
    """Where the data directory goes; a cluster a server left running there is stopped."""
    with scratch_dir("chatproxy-serve-") as path:
        yield path


@pytest.fixture
def servers(root: Path) -> Iterator[list[Server]]:
    """Every server a test starts; whatever is still running afterwards is stopped."""
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([CHATPROXY, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_serve_on_the_embedded_database_survives_a_restart(
    tmp_path: Path, root: Path, servers: list[Server]
) -> None:
    config = tmp_path / "chatproxy.toml"
    config.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHATPROXY_") and k != "OPENAI_API_KEY"}
    env.update({"CHATPROXY_CONFIG": str(config), "CHATPROXY_DATA_DIR": str(root / "data"),
                "CHATPROXY_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1"})
    pgdata = (root / "data" / "pg").resolve()
    port = free_port()

    first = Server(env, port, tmp_path / "serve-1.log")
    servers.append(first)
    first.wait_healthy()
    assert cluster_running(pgdata)
    assert httpx.get(first.url + "/ready").json() == {"status": "ready"}

    # The CLI joins the running server's cluster.
    user_id = cli(env, "users", "create", "e2e-user").strip()
    assert re.fullmatch(r"user_\w+", user_id)
    key = cli(env, "keys", "create", "e2e-user").splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}

    r = httpx.post(first.url + "/v1/chat/sessions", json={"session_name": "kept"},
                   headers=headers)
    assert r.status_code == 201, r.text
    session = r.json()
    listed = httpx.get(first.url + "/v1/chat/sessions", headers=headers).json()
    assert [s["id"] for s in listed["data"]] == [session["id"]]
    assert httpx.get(first.url + "/nope").json()["error"]["code"] == "not_found"

    assert first.terminate() == 0
    assert not cluster_running(pgdata)  # the last process on the data directory stopped it

    # Restarted on the same data directory, with two workers sharing the one cluster.
    second = Server(env, port, tmp_path / "serve-2.log", "--workers", "2")
    servers.append(second)
    second.wait_healthy()
    for _ in range(4):  # whichever worker answers
        again = httpx.get(f"{second.url}/chat/sessions/{session['id']}", headers=headers)
        assert (again.status_code, again.json()) == (200, session)
    assert second.terminate() == 0
    # The workers were stopped by a signal; the last process still stopped the cluster.
    assert not cluster_running(pgdata)
