"""The README's quick start is true (issue 14, item 8): its copy-paste block, run as it stands
against a live `chatproxy serve` on a fresh embedded cluster and a fake upstream, creates a user
and a key with the CLI and shows history at work in a session."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.fake_upstream import FakeUpstream
from tests.fault_helpers import Serve, scratch_dir

pytestmark = pytest.mark.e2e

UPSTREAM_KEY = "sk-quickstart-upstream-key"


def readme_block(name: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- {name}:start -->\n```sh\n(.*?)```\n<!-- {name}:end -->", readme,
                      re.S)
    assert found is not None, f"the README has no {name} block"
    return found.group(1)


@pytest.mark.timeout(300)
def test_the_quick_start_block_runs_as_written(tmp_path: Path) -> None:
    block = readme_block("quickstart-try")
    assert block.startswith(". .venv/bin/activate\n")
    venv = Path(sys.prefix)
    assert (venv / "bin" / "activate").exists(), "the tests run in a virtualenv"
    # "The same directory" as the server: its ./data is the server's, its .venv this one.
    with FakeUpstream() as fake, scratch_dir("chatproxy-quickstart-") as workdir:
        (workdir / ".venv").symlink_to(venv)
        server = Serve({"CHATPROXY_CONFIG": os.devnull,
                        "CHATPROXY_DATA_DIR": str(workdir / "data"),
                        "CHATPROXY_UPSTREAM_BASE_URL": fake.url + "/v1",
                        "OPENAI_API_KEY": UPSTREAM_KEY}, tmp_path / "serve.log")
        try:
            server.start()
            shell = {k: v for k, v in os.environ.items()
                     if not k.startswith(("CHATPROXY_", "VIRTUAL_ENV"))
                     and k != "OPENAI_API_KEY"}
            done = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c",
                 block.replace("localhost:8000", f"127.0.0.1:{server.port}")],
                cwd=workdir, env=shell, capture_output=True, text=True, timeout=120,
                check=False)
        finally:
            server.stop()

    assert done.returncode == 0, done.stdout + done.stderr
    # The CLI's own lines: the key's id on stderr, and nothing else (no warning).
    assert re.fullmatch(r"key id: key_\w+ \(user alice\)\n", done.stderr), done.stderr
    out = done.stdout
    assert re.match(r"user_\w+\n", out)
    assert '"content": "echo: My name is Ada."' in out
    assert re.search(r"^x-history-messages: 2$", out, re.MULTILINE | re.IGNORECASE), out
    listed = json.loads(out.splitlines()[-1])
    assert [(m["role"], m["content"]) for m in listed["data"]] == [
        ("user", "My name is Ada."), ("assistant", "echo: My name is Ada."),
        ("user", "What is my name?"), ("assistant", "echo: What is my name?"),
    ]
    # The second turn went upstream with the first one in front of it, with the server's key.
    chats = [r for r in fake.requests if r.path == "/v1/chat/completions"]
    assert [[m["content"] for m in r.body["messages"]] for r in chats] == [
        ["My name is Ada."],
        ["My name is Ada.", "echo: My name is Ada.", "What is my name?"],
    ]
    assert {r.headers["authorization"] for r in chats} == {f"Bearer {UPSTREAM_KEY}"}
    log = server.log()
    assert "XDG_RUNTIME_DIR" not in log and "no upstream key" not in log
