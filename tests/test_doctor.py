"""`chatproxy doctor` (issue 14, item 8), run as a subprocess against a fake upstream."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from proxy import db
from proxy.config import load_settings
from proxy.migrate import discover, migrate, pending
from tests.conftest import ROOT, UPSTREAM_KEY, fresh_database
from tests.fake_upstream import FakeUpstream
from tests.fault_helpers import free_port

CHATPROXY = str(Path(sys.executable).parent / "chatproxy")
MODELS = str(ROOT / "config" / "models.toml")
ALL = [m.name for m in discover()]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


def doctor(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("CHATPROXY_") and k != "OPENAI_API_KEY"}
    environ.update(CHATPROXY_MODELS_FILE=MODELS, **env)
    return subprocess.run([CHATPROXY, "doctor"], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=60, check=False)


def upstreams_file(tmp_path: Path, *entries: tuple[str, str, str]) -> str:
    path = tmp_path / "chatproxy.toml"
    path.write_text("".join(
        f'[[upstreams]]\nname = "{name}"\nbase_url = "{url}"\napi_key_env = "{key_env}"\n'
        f'models = ["{name}*"]\n\n' for name, url, key_env in entries))
    return str(path)


async def test_pending_lists_what_migrate_would_apply(server_url: str) -> None:
    async with fresh_database(server_url, migrated=False) as url:
        conn = await asyncpg.connect(url)
        try:
            assert await pending(conn) == ALL
            await migrate(conn)
            assert await pending(conn) == []
        finally:
            await conn.close()


async def test_doctor_reports_the_database_and_every_upstream(
    tmp_path: Path, server_url: str, fake: FakeUpstream
) -> None:
    gone = f"http://127.0.0.1:{free_port()}/v1"
    config = upstreams_file(tmp_path, ("local", fake.url + "/v1", ""),
                            ("gone", gone, "GONE_KEY"), ("wrong", fake.url + "/nope", ""))
    async with fresh_database(server_url, migrated=False) as url:
        env = {"CHATPROXY_CONFIG": config, "CHATPROXY_DATABASE_URL": url,
               "CHATPROXY_UPSTREAM_BASE_URL": fake.url + "/v1",
               "CHATPROXY_UPSTREAM_API_KEY": UPSTREAM_KEY}
        seen = len(fake.requests)
        done = doctor(tmp_path, **env)
        data = db.describe(load_settings(env))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"ok        database answers \(PostgreSQL [\d.]+\); migrations: "
                        + re.escape(f"{len(ALL)} pending, applied at the next `chatproxy "
                                    f"serve` or `chatproxy migrate`: {', '.join(ALL)}"),
                        lines[3]), lines[3]
    assert lines[:3] + lines[4:] == [
        f"config    {config}",
        f"ok        model table {MODELS} loads",
        f"data      {data}",
        f"ok        upstream local at {fake.url}/v1 (no key: api_key_env is empty): "
        "GET /models answered 200, 1 model",
        f"FAIL      upstream gone at {gone} (no key: GONE_KEY is unset): GET /models failed: "
        "ConnectError (All connection attempts failed)",
        f"FAIL      upstream wrong at {fake.url}/nope (no key: api_key_env is empty): "
        "GET /models answered 404",
        f"ok        upstream default at {fake.url}/v1 (with its key): "
        "GET /models answered 200, 1 model",
        "2 checks failed",
    ]
    asked = [(r.path, r.headers.get("authorization")) for r in fake.requests[seen:]]
    assert sorted(asked, key=str) == sorted([
        ("/v1/models", None), ("/nope/models", None),
        ("/v1/models", f"Bearer {UPSTREAM_KEY}")], key=str)
    assert UPSTREAM_KEY not in done.stdout


def test_doctor_exits_zero_when_everything_answers(
    tmp_path: Path, database_url: str, fake: FakeUpstream
) -> None:
    done = doctor(tmp_path, CHATPROXY_CONFIG=os.devnull, CHATPROXY_DATABASE_URL=database_url,
                  CHATPROXY_UPSTREAM_BASE_URL=fake.url + "/v1", OPENAI_API_KEY=UPSTREAM_KEY)
    assert (done.returncode, done.stderr) == (0, "")
    assert "migrations: none pending" in done.stdout
    assert done.stdout.splitlines()[-2:] == [
        f"ok        upstream default at {fake.url}/v1 (with its key): "
        "GET /models answered 200, 1 model",
        "everything answers",
    ]


def test_doctor_never_creates_a_database(tmp_path: Path, fake: FakeUpstream) -> None:
    done = doctor(tmp_path, CHATPROXY_UPSTREAM_BASE_URL=fake.url + "/v1")
    pgdata = tmp_path / "data" / "pg"
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "config    no file: defaults and environment",
        f"ok        model table {MODELS} loads",
        f"data      embedded PostgreSQL in {pgdata}",
        "FAIL      no database: CHATPROXY_DATABASE_URL is unset and there is no embedded "
        f"PostgreSQL cluster in {pgdata}",
        "          To use the server's database, run this command in the directory where "
        "`chatproxy serve` runs,",
        "          or set CHATPROXY_DATA_DIR to the server's data directory, or "
        "CHATPROXY_DATABASE_URL to its PostgreSQL URL.",
        "          (`chatproxy serve` and `chatproxy migrate` create a new cluster.)",
        f"ok        upstream default at {fake.url}/v1 (no key: set CHATPROXY_UPSTREAM_API_KEY "
        "or OPENAI_API_KEY): GET /models answered 200, 1 model",
        "1 check failed",
    ]
    assert list(tmp_path.iterdir()) == []
