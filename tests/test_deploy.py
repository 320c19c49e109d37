"""The shipped configuration examples and container files agree with the settings code."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    logical = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)  # a continuation may span comments
    instructions = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def dockerignored(path: str) -> bool:
    """Whether `.dockerignore` keeps `path` (or a folder above it) out of the build context,
    with Docker's rules: patterns are anchored at the context root, `*` and `?` stay within one
    path segment, `**` spans any number, and a later `!pattern` takes a path back."""
    patterns = [line.strip() for line in
                (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.strip().startswith("#")]
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        regex = "".join(
            ".*" if token == "**" else "[^/]*" if token == "*" else "[^/]" if token == "?"
            else re.escape(token)
            for token in re.findall(r"\*\*|\*|\?|[^*?]+", glob)
        ).replace(".*/", "(.*/)?")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not keep
    return ignored


def test_the_dockerignore_matcher_follows_dockers_rules() -> None:
    assert dockerignored("tests/test_deploy.py") and dockerignored(".venv")
    assert dockerignored("proxy/__pycache__/app.cpython-311.pyc")
    assert dockerignored(".env") and dockerignored(".env.local")
    assert not dockerignored("proxy/app.py") and not dockerignored("config/models.toml")


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    stages = set()
    sources = []
    for word, rest in dockerfile_instructions():
        if word == "FROM" and " AS " in rest.upper():
            stages.add(rest.split()[-1])
        if word in ("COPY", "ADD"):
            flags = [a for a in rest.split() if a.startswith("--")]
            args = [a for a in rest.split() if not a.startswith("--")]
            if any(f.startswith("--from=") for f in flags):
                assert {f.removeprefix("--from=") for f in flags} <= stages, rest
                continue
            sources += args[:-1]
    assert sorted(sources) == sorted(
        ["pyproject.toml", "README.md", "proxy", "sql", "config", "sql", "config"])
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), source
    # What the image must never get: secrets, the virtualenv, local data, the tests.
    for kept_out in (".env", "config/prod.env", ".venv/bin/python", "data/pg/PG_VERSION",
                     "tests/conftest.py", ".git/HEAD"):
        assert dockerignored(kept_out), kept_out


def test_the_dockerfile_builds_with_the_classic_builder_too() -> None:
    """No BuildKit-only syntax: no `RUN --mount` (or other RUN flags), no `# syntax=` line,
    no heredocs, no `COPY --link`/`--chmod` (the classic builder refuses them)."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert not re.search(r"^#\s*syntax=", text, re.MULTILINE | re.IGNORECASE)
    assert "<<" not in text
    for word, rest in dockerfile_instructions():
        if word == "RUN":
            assert not rest.startswith("--"), rest
        if word in ("COPY", "ADD"):
            assert not re.search(r"--(link|chmod|parents|exclude)\b", rest), rest


def test_the_runtime_image_runs_the_server_unprivileged_with_a_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    runtime = dockerfile[dockerfile.rindex("\nFROM "):]
    assert "FROM python:3.11-slim\n" in runtime
    assert re.search(r"^RUN useradd .*--uid 10001 .*chatproxy$", runtime, re.MULTILINE)
    assert re.search(r"^USER 10001:10001$", runtime, re.MULTILINE)
    assert 'CMD ["chatproxy", "serve", "--host", "0.0.0.0"]' in runtime
    assert "/health" in runtime[runtime.index("HEALTHCHECK"):]
    assert "EXPOSE 8000" in runtime
    assert not re.search(r"gcc|build-essential", runtime)
