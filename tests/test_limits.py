"""What `chatproxy serve` sets up for its process.

Its soft open-files limit is raised to the hard one, since a stream holds 2 sockets, and the heap
its startup built is frozen out of the cyclic collector's full passes (proxy/app.py, `_frozen`).
"""

from __future__ import annotations

import gc
import resource
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from proxy import app as app_module
from proxy import server
from proxy.config import Settings
from tests.fault_helpers import FakeUpstream, Serve, serve_env


def open_files_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open files line in /proc/PID/limits")


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs Linux /proc")
def test_serve_raises_the_soft_open_files_limit_to_the_hard_one(
    database_url: str, tmp_path: Path
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("the hard limit leaves nothing to raise")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    with FakeUpstream() as fake:
        env = serve_env(database_url, fake.base_url, tmp_path)
        server = Serve(env, tmp_path / "serve.log", preexec=low_soft_limit).start()
        try:
            assert server.process is not None
            assert open_files_limits(server.process.pid) == (str(hard), str(hard))
        finally:
            server.stop()


async def test_serve_freezes_the_heap_its_startup_built(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gc.get_freeze_count() == 0
    # The app of the tests' `client` fixture is not frozen: only serve's factory asks for it.
    async with AsyncTestClient(app=app_module.create_app(settings)):
        assert gc.get_freeze_count() == 0
    monkeypatch.setattr(app_module, "load_settings", lambda environ: settings)
    try:
        async with AsyncTestClient(app=app_module.app_from_env()) as client:
            assert gc.get_freeze_count() > 0
            assert (await client.get("/health")).status_code == 200
    finally:
        gc.unfreeze()


def test_the_connection_cap_stays_within_the_open_files_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Each open stream holds two sockets, so the cap leaves half the files (and a reserve)
    # to the upstream side: the file limit is never what fails first.
    monkeypatch.setattr(server.resource, "getrlimit", lambda which: (1064, 1064))
    assert server.max_connections(Settings(max_connections=4096)) == 500
    assert "CHATPROXY_MAX_CONNECTIONS lowered from 4096 to 500" in caplog.text
    assert server.max_connections(Settings(max_connections=300)) == 300
    options = server.uvicorn_options(Settings(head_timeout=7, max_head_bytes=2048,
                                              max_connections=300, send_timeout=9.5))
    protocol = options.pop("http")
    assert (protocol.func, protocol.args, protocol.keywords) == (
        server.GuardedProtocol, (), {"send_timeout": 9.5})
    assert options == {"timeout_keep_alive": 7, "h11_max_incomplete_event_size": 2048,
                       "limit_concurrency": 300}
