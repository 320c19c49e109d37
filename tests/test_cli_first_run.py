"""The CLI on a first run (issue 14, items 1 and 5), as subprocesses in an empty directory.

A command other than `serve` and `migrate` never creates a database: with no URL and no cluster
where it looks, it says where it looked and how to point it at the server's. No command prints
platformdirs' RuntimeDirWarning; mistakes that used to pass silently are named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_upstream import FakeUpstream
from tests.fault_helpers import Serve, cluster_running, free_port, scratch_dir

CHATPROXY = str(Path(sys.executable).parent / "chatproxy")


def clean_env(**extra: str) -> dict[str, str]:
    """The user's environment without any chatproxy setting, XDG_RUNTIME_DIR or upstream key
    (as in a container or a fresh login over `su`)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHATPROXY_")
           and k not in ("OPENAI_API_KEY", "XDG_RUNTIME_DIR", "TIKTOKEN_CACHE_DIR")}
    env.update(extra)
    return env


def run(cwd: Path, env: dict[str, str], *args: str,
        stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHATPROXY, *args], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)


def no_database(pgdata: Path) -> str:
    return (
        "chatproxy: no database: CHATPROXY_DATABASE_URL is unset and there is no embedded "
        f"PostgreSQL cluster in {pgdata}\n"
        "  To use the server's database, run this command in the directory where "
        "`chatproxy serve` runs,\n"
        "  or set CHATPROXY_DATA_DIR to the server's data directory, or "
        "CHATPROXY_DATABASE_URL to its PostgreSQL URL.\n"
        "  (`chatproxy serve` and `chatproxy migrate` create a new cluster.)\n"
    )


@pytest.fixture
def workdir() -> Iterator[Path]:
    with scratch_dir("chatproxy-cli-") as path:
        yield path


COMMANDS = [
    ("users", "create", "alice"),
    ("keys", "create", "alice"),
    ("keys", "revoke", "key_x"),
    ("cleanup",),
    ("sessions", "export", "sess_x"),
    ("sessions", "import", "-", "--user", "alice"),
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: " ".join(args[:2]))
def test_a_command_never_creates_a_database_where_there_is_none(
    workdir: Path, args: tuple[str, ...]
) -> None:
    done = run(workdir, clean_env(), *args, stdin="{}")
    assert (done.returncode, done.stdout, done.stderr) == (
        1, "", no_database(workdir / "data" / "pg"))
    assert list(workdir.iterdir()) == []  # not even ./data

    elsewhere = workdir / "server-data"
    done = run(workdir, clean_env(CHATPROXY_DATA_DIR=str(elsewhere)), *args, stdin="{}")
    assert (done.returncode, done.stdout, done.stderr) == (1, "", no_database(elsewhere / "pg"))
    assert not elsewhere.exists()


def test_migrate_creates_the_cluster_and_says_so_then_every_command_joins_it(
    workdir: Path,
) -> None:
    """`migrate` prepares a database, so it may create one (contract §1); it says so, once.
    No command prints platformdirs' RuntimeDirWarning (XDG_RUNTIME_DIR is unset here)."""
    pgdata = workdir / "data" / "pg"
    first = run(workdir, clean_env(), "migrate")
    assert (first.returncode, first.stdout, first.stderr) == (
        0, "database is up to date\n",
        f"created an embedded PostgreSQL cluster in {pgdata}\n")
    again = run(workdir, clean_env(), "migrate")
    assert (again.returncode, again.stdout, again.stderr) == (0, "database is up to date\n", "")
    created = run(workdir, clean_env(), "users", "create", "alice")
    assert (created.returncode, created.stderr) == (0, "")
    assert created.stdout.startswith("user_")
    key = run(workdir, clean_env(), "keys", "create", "alice")
    assert key.returncode == 0 and key.stdout.startswith("sk-cp-")
    assert "XDG_RUNTIME_DIR" not in key.stderr and "Warning" not in key.stderr
    # The last process on the cluster stopped it.
    assert not cluster_running(pgdata)


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_serve_refuses_a_worker_count_below_one(workdir: Path, workers: str) -> None:
    done = run(workdir, clean_env(), "serve", "--workers", workers)
    reason = "expected a whole number, got 'two'" if workers == "two" else (
        f"must be 1 or more, got {workers}")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"chatproxy serve: error: argument --workers: {reason}")
    assert list(workdir.iterdir()) == []


def test_an_unknown_chatproxy_variable_is_named_with_the_closest_setting(
    workdir: Path, database_url: str
) -> None:
    env = clean_env(CHATPROXY_DATABASE_URL=database_url, CHATPROXY_CONFIG=os.devnull,
                    CHATPROXY_PROT="8080", CHATPROXY_LOGLEVEL="debug", CHATPROXY_XYZZY="1",
                    CHATPROXY_TEST_DATABASE_URL=database_url)  # read by the tests: not a typo
    done = run(workdir, env, "migrate")
    assert (done.returncode, done.stdout) == (0, "database is up to date\n")
    assert done.stderr.splitlines() == [
        "chatproxy: warning: CHATPROXY_LOGLEVEL is not a chatproxy setting and is ignored; "
        "did you mean CHATPROXY_LOG_LEVEL?",
        "chatproxy: warning: CHATPROXY_PROT is not a chatproxy setting and is ignored; "
        "did you mean CHATPROXY_PORT?",
        "chatproxy: warning: CHATPROXY_XYZZY is not a chatproxy setting and is ignored",
    ]


def records(server: Serve) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


@pytest.mark.e2e
def test_serve_says_once_what_is_missing_and_how_to_fix_it(
    workdir: Path, database_url: str
) -> None:
    """With two workers: the missing upstream key and the unknown variable are said once (by
    serve, not by each worker); tiktoken's fallback once per process, with the fix."""
    with FakeUpstream() as upstream:
        env = clean_env(
            CHATPROXY_CONFIG=os.devnull, CHATPROXY_DATABASE_URL=database_url,
            CHATPROXY_UPSTREAM_BASE_URL=upstream.url + "/v1", CHATPROXY_PROT="1",
            # tiktoken finds nothing cached and cannot download (a closed port as its proxy).
            TIKTOKEN_CACHE_DIR=str(workdir / "empty-cache"),
            HTTPS_PROXY=f"http://127.0.0.1:{free_port()}",
        )
        server = Serve(env, workdir / "serve.log", args=("--workers", "2"))
        try:
            server.start()
        finally:
            server.stop()
    lines = records(server)
    warnings = [(r["logger"], r["msg"]) for r in lines if r["level"] == "warning"]
    assert warnings.count(("chatproxy", "no upstream key configured for default (set "
                           "CHATPROXY_UPSTREAM_API_KEY or OPENAI_API_KEY): requests to it "
                           "carry no key")) == 1
    assert warnings.count(("chatproxy", "CHATPROXY_PROT is not a chatproxy setting and is "
                           "ignored; did you mean CHATPROXY_PORT?")) == 1
    tiktoken = [msg for logger, msg in warnings if logger == "chatproxy.tokens"]
    assert len(tiktoken) == 2  # one per worker process, each a process of its own
    for msg in tiktoken:
        assert msg.startswith("tiktoken could not load encoding ")
        assert ("To fix: where there is network, run `TIKTOKEN_CACHE_DIR=DIR python -c "
                "\"import tiktoken; tiktoken.get_encoding('cl100k_base'); "
                "tiktoken.get_encoding('o200k_base')\"` once, and start chatproxy with "
                "TIKTOKEN_CACHE_DIR=DIR") in msg
    assert not [r for r in lines if r["level"] in ("error", "critical") or "exc" in r]
