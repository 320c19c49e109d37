"""`chatproxy serve` raises its soft open-files limit to the hard one: a stream holds 2 sockets."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from tests.fault_helpers import FakeUpstream, Serve, serve_env

pytestmark = pytest.mark.e2e


def open_files_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open files line in /proc/PID/limits")


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
