"""The shipped configuration examples and container files agree with the settings code."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from proxy.config import FIELDS, Settings, load_settings
from tests.conftest import ROOT

EXAMPLE = ROOT / "config" / "chatproxy.toml"
COMMENTED_KEY = re.compile(r"^# (\w+) = (.+)$")


def commented_settings() -> dict[str, object]:
    found = {}
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = COMMENTED_KEY.match(line)
        if match and match.group(1) in {f.key for f in FIELDS}:
            found[match.group(1)] = tomllib.loads(f"v = {match.group(2)}")["v"]
    return found


def test_the_example_config_changes_nothing_when_loaded() -> None:
    assert load_settings({"CHATPROXY_CONFIG": str(EXAMPLE)}) == Settings()


def test_the_example_config_shows_every_setting_with_its_default() -> None:
    shown = commented_settings()
    assert set(shown) == {f.key for f in FIELDS}
    defaults = {f.key: f.default for f in FIELDS if f.default is not None}
    assert {key: shown[key] for key in defaults} == defaults


def test_the_example_upstreams_load(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    block = text[text.index("# [[upstreams]]"):]
    config = tmp_path / "chatproxy.toml"
    config.write_text("\n".join(line.removeprefix("#").strip() for line in block.splitlines()))
    settings = load_settings({"CHATPROXY_CONFIG": str(config), "OPENROUTER_API_KEY": "k-1"})
    assert [(u.name, u.api_key, u.models) for u in settings.upstreams] == [
        ("local", None, ("llama*", "qwen*")),
        ("openrouter", "k-1", ("anthropic/*", "google/*")),
    ]
    assert settings.upstream_for("qwen2.5").name == "local"
    assert settings.upstream_for("gpt-4o").name == "default"


def test_the_env_example_names_known_variables_and_holds_no_secret() -> None:
    known = {f.env for f in FIELDS} | {"OPENAI_API_KEY", "POSTGRES_PASSWORD"}
    lines = (ROOT / "config" / "chatproxy.env.example").read_text(encoding="utf-8").splitlines()
    assignments = [re.match(r"^(#\s*)?([A-Z_]+)=(.*)$", line) for line in lines]
    names = {m.group(2) for m in assignments if m}
    assert names <= known
    assert {"OPENAI_API_KEY", "CHATPROXY_ADMIN_KEY", "POSTGRES_PASSWORD"} <= names
    assert all(m.group(3) == "" for m in assignments if m and not m.group(1))


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "proxy", "sql", "config"])
def test_the_docker_context_keeps_what_the_dockerfile_copies(path: str) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(rf"^COPY .*\b{re.escape(path)}\b", dockerfile, re.MULTILINE)
    ignored = [
        line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert path not in ignored


def test_the_runtime_image_runs_the_server_unprivileged_with_a_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    runtime = dockerfile[dockerfile.rindex("\nFROM "):]
    assert "FROM python:3.11-slim\n" in runtime
    assert re.search(r"^USER chatproxy$", runtime, re.MULTILINE)
    assert 'CMD ["chatproxy", "serve", "--host", "0.0.0.0"]' in runtime
    assert "/health" in runtime[runtime.index("HEALTHCHECK"):]
    assert "EXPOSE 8000" in runtime
    assert not re.search(r"gcc|build-essential", runtime)
