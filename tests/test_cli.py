"""The `chatproxy` command as a user runs it: a subprocess against the test database."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from proxy import auth
from tests.conftest import until_key_cached

ROOT = Path(__file__).resolve().parent.parent
KEY_RE = re.compile(r"sk-cp-[A-Za-z0-9_-]{43}")


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI run: the test database, an empty TOML file, nothing inherited."""
    config = tmp_path / "chatproxy.toml"
    config.write_text("")
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("CHATPROXY_") and k != "OPENAI_API_KEY"}
    return {**base, "CHATPROXY_CONFIG": str(config), "CHATPROXY_DATABASE_URL": database_url,
            "CHATPROXY_DATA_DIR": str(tmp_path / "data")}


def script() -> list[str]:
    found = Path(sys.executable).parent / "chatproxy"
    assert found.exists(), "the console script is installed with the package"
    return [str(found)]


def module() -> list[str]:
    return [sys.executable, "-m", "proxy"]


def run(command: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)


async def test_migrate(env: dict[str, str], db: asyncpg.Connection) -> None:
    for command in (module(), script()):
        done = run(command, env, "migrate")
        assert (done.returncode, done.stdout, done.stderr) == (0, "database is up to date\n", "")
    names = [r["name"] for r in await db.fetch("SELECT name FROM schema_migrations")]
    assert "001_init" in names


async def test_users_and_keys_end_to_end(env: dict[str, str], db: asyncpg.Connection,
                                         client) -> None:
    created = run(script(), env, "users", "create", "cli-frank")
    assert created.returncode == 0, created.stderr
    user_id = created.stdout.strip()
    assert re.fullmatch(r"user_[A-Za-z0-9]{24}", user_id) and created.stdout == user_id + "\n"
    row = await db.fetchrow("SELECT id, name FROM users WHERE name = 'cli-frank'")
    assert (row["id"], row["name"]) == (user_id, "cli-frank")

    taken = run(module(), env, "users", "create", "cli-frank")
    assert (taken.returncode, taken.stdout, taken.stderr) == (
        1, "", "chatproxy: a user named 'cli-frank' already exists\n")

    # By name, with a label; and by id.
    first = run(module(), env, "keys", "create", "cli-frank", "--name", "laptop")
    second = run(script(), env, "keys", "create", user_id)
    keys = []
    for done in (first, second):
        assert done.returncode == 0, done.stderr
        last = done.stdout.splitlines()[-1]
        assert KEY_RE.fullmatch(last)
        assert last not in done.stderr
        keys.append(last)
    key, other = keys
    row = await db.fetchrow("SELECT id, user_id, name, prefix FROM api_keys WHERE key_hash = $1",
                            auth.hash_key(key))
    assert (row["user_id"], row["name"], row["prefix"]) == (user_id, "laptop", key[:12])
    assert row["id"] in first.stderr  # the key id is shown, for revoking later

    headers = {"Authorization": f"Bearer {key}"}
    r = await client.post("/v1/chat/sessions", json={"session_name": "from the cli key"},
                          headers=headers)
    assert r.status_code == 201, r.text

    await until_key_cached(client, key)  # the revocation must reach a cached key too
    revoked = run(script(), env, "keys", "revoke", row["id"])
    assert (revoked.returncode, revoked.stdout) == (0, f"revoked {row['id']}\n")
    r = await client.get("/v1/chat/sessions", headers=headers)
    assert (r.status_code, r.json()) == (401, {"error": {
        "message": "Invalid API key", "type": "invalid_request_error", "param": None,
        "code": "invalid_api_key"}})
    # The user's other key is untouched.
    r = await client.get("/v1/chat/sessions", headers={"Authorization": f"Bearer {other}"})
    assert (r.status_code, r.json()["total"]) == (200, 1)


def test_refusals_are_one_line_and_non_zero(env: dict[str, str]) -> None:
    cases = [
        (("keys", "create", "no-such-user-anywhere"),
         "chatproxy: no user 'no-such-user-anywhere'\n"),
        (("keys", "revoke", "key_nope"), "chatproxy: no key 'key_nope'\n"),
        (("users", "create", "   "), "chatproxy: a user name cannot be empty\n"),
    ]
    for args, stderr in cases:
        done = run(module(), env, *args)
        assert (done.returncode, done.stdout, done.stderr) == (1, "", stderr), args


@pytest.mark.parametrize(
    ("variable", "value", "stderr"),
    [
        ("CHATPROXY_PORT", "eighty",
         "chatproxy: configuration error: CHATPROXY_PORT: expected an integer, got 'eighty'\n"),
        ("CHATPROXY_DATABASE_URL", "mysql://localhost/chat",
         "chatproxy: configuration error: CHATPROXY_DATABASE_URL: expected a postgresql:// URL\n"),
        ("CHATPROXY_LOG_LEVEL", "chatty",
         "chatproxy: configuration error: CHATPROXY_LOG_LEVEL: expected one of debug, info, "
         "warning, error, critical, got 'chatty'\n"),
    ],
)
def test_a_bad_config_value_is_one_line_naming_the_key(
    env: dict[str, str], variable: str, value: str, stderr: str
) -> None:
    for args in (("migrate",), ("users", "create", "x"), ("serve",)):
        done = run(script(), {**env, variable: value}, *args)
        assert (done.returncode, done.stdout, done.stderr) == (1, "", stderr), args


def test_a_bad_value_in_the_file_names_the_key(env: dict[str, str], tmp_path: Path) -> None:
    Path(env["CHATPROXY_CONFIG"]).write_text("retention_days = 'forever'\n")
    done = run(script(), env, "migrate")
    assert (done.returncode, done.stdout, done.stderr) == (
        1, "", "chatproxy: configuration error: retention_days: expected an integer, "
               "got 'forever'\n")


def test_a_bad_models_file_stops_serve_before_it_starts(env: dict[str, str],
                                                        tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[models."gpt-4"]\ncontext_window = "big"\n')
    done = run(script(), {**env, "CHATPROXY_MODELS_FILE": str(models)}, "serve", "--port", "1")
    assert (done.returncode, done.stdout, done.stderr) == (
        1, "", 'chatproxy: configuration error: models."gpt-4".context_window: '
               "expected a non-negative integer\n")


def test_an_unreachable_database_is_one_line(env: dict[str, str]) -> None:
    done = run(script(), {**env, "CHATPROXY_DATABASE_URL": "postgresql://127.0.0.1:1/chat"},
               "migrate")
    assert done.returncode == 1
    assert done.stdout == ""
    assert re.fullmatch(r"chatproxy: database error: \w+\n", done.stderr), done.stderr


def test_usage_errors_exit_non_zero(env: dict[str, str]) -> None:
    done = run(script(), env, "keys")
    assert done.returncode == 2
    assert "usage: chatproxy keys" in done.stderr
