"""Settings: defaults, the TOML file, environment overrides, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import FIELDS, ConfigError, Settings, Upstream, load_settings
from proxy.tokens import ModelTable


@pytest.fixture(autouse=True)
def _no_local_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run where no `config/chatproxy.toml` exists, so only what a test writes is read."""
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "chatproxy.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_for(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_defaults_match_the_fields_table_and_the_settings_class() -> None:
    settings = load_settings({})
    assert settings == Settings()
    for spec in FIELDS:
        assert getattr(settings, spec.key) == spec.default, spec.key
    assert settings.database_url is None
    assert settings.data_dir == "./data"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.upstream_base_url == "https://api.openai.com/v1"
    assert settings.admin_key is None
    assert settings.max_body_bytes == 10_485_760
    assert settings.retention_days == 7
    assert settings.upstreams == ()


def test_every_field_has_an_env_name_and_a_doc() -> None:
    keys = [spec.key for spec in FIELDS]
    assert len(keys) == len(set(keys))
    for spec in FIELDS:
        assert spec.env == "CHATPROXY_" + spec.key.upper()
        assert spec.doc
    assert set(keys) | {"upstreams"} == set(Settings.__dataclass_fields__)


def test_environment_values_are_parsed() -> None:
    settings = load_settings({
        "CHATPROXY_DATABASE_URL": "postgresql://u:p@db.example:5433/chat",
        "CHATPROXY_DATA_DIR": "/var/lib/chatproxy",
        "CHATPROXY_HOST": "0.0.0.0",
        "CHATPROXY_PORT": "9000",
        "CHATPROXY_UPSTREAM_BASE_URL": "http://127.0.0.1:11434/v1/",
        "CHATPROXY_UPSTREAM_API_KEY": "sk-up",
        "CHATPROXY_ADMIN_KEY": "admin",
        "CHATPROXY_DEFAULT_MAX_HISTORY_MESSAGES": "0",
        "CHATPROXY_RETENTION_DAYS": "0",
        "CHATPROXY_MAX_STORED_MESSAGES": "500",
        "CHATPROXY_MAX_BODY_BYTES": "2048",
        "CHATPROXY_UPSTREAM_CONNECT_TIMEOUT": "2.5",
        "CHATPROXY_UPSTREAM_TIMEOUT": "30",
        "CHATPROXY_LOG_LEVEL": "DEBUG",
    })
    assert settings == Settings(
        database_url="postgresql://u:p@db.example:5433/chat",
        data_dir="/var/lib/chatproxy",
        host="0.0.0.0",
        port=9000,
        upstream_base_url="http://127.0.0.1:11434/v1",
        upstream_api_key="sk-up",
        admin_key="admin",
        default_max_history_messages=0,
        retention_days=0,
        max_stored_messages=500,
        max_body_bytes=2048,
        upstream_connect_timeout=2.5,
        upstream_timeout=30.0,
        log_level="debug",
    )


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 9001\nhost = "0.0.0.0"\nadmin_key = "from-file"\n')
    settings = load_settings({"CHATPROXY_CONFIG": path, "CHATPROXY_PORT": "9002"})
    assert (settings.port, settings.host, settings.admin_key) == (9002, "0.0.0.0", "from-file")


def test_the_default_file_is_read_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", "port = 8123\n")
    assert load_settings({}).port == 8123


def test_upstream_key_falls_back_to_openai_api_key(tmp_path: Path) -> None:
    assert load_settings({"OPENAI_API_KEY": "sk-openai"}).upstream_api_key == "sk-openai"
    both = {"OPENAI_API_KEY": "sk-openai", "CHATPROXY_UPSTREAM_API_KEY": "sk-mine"}
    assert load_settings(both).upstream_api_key == "sk-mine"
    path = write(tmp_path, 'upstream_api_key = "sk-file"\n')
    assert load_settings({"CHATPROXY_CONFIG": path, "OPENAI_API_KEY": "x"}).upstream_api_key == (
        "sk-file"
    )


def test_empty_optional_values_mean_unset() -> None:
    settings = load_settings({"CHATPROXY_DATABASE_URL": "", "CHATPROXY_ADMIN_KEY": ""})
    assert settings.database_url is None
    assert settings.admin_key is None


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CHATPROXY_PORT": "abc"}, "CHATPROXY_PORT: expected an integer, got 'abc'"),
        ({"CHATPROXY_PORT": ""}, "CHATPROXY_PORT: expected an integer, got ''"),
        ({"CHATPROXY_PORT": "8000.5"}, "CHATPROXY_PORT: expected an integer, got '8000.5'"),
        ({"CHATPROXY_PORT": "0"}, "CHATPROXY_PORT: must be between 1 and 65535, got 0"),
        ({"CHATPROXY_PORT": "70000"}, "CHATPROXY_PORT: must be between 1 and 65535, got 70000"),
        ({"CHATPROXY_RETENTION_DAYS": "-1"}, "CHATPROXY_RETENTION_DAYS: must be >= 0, got -1"),
        (
            {"CHATPROXY_DEFAULT_MAX_HISTORY_MESSAGES": "1001"},
            "CHATPROXY_DEFAULT_MAX_HISTORY_MESSAGES: must be between 0 and 1000, got 1001",
        ),
        ({"CHATPROXY_MAX_BODY_BYTES": "10"}, "CHATPROXY_MAX_BODY_BYTES: must be >= 1024, got 10"),
        (
            {"CHATPROXY_UPSTREAM_TIMEOUT": "soon"},
            "CHATPROXY_UPSTREAM_TIMEOUT: expected a number, got 'soon'",
        ),
        (
            {"CHATPROXY_UPSTREAM_TIMEOUT": "nan"},
            "CHATPROXY_UPSTREAM_TIMEOUT: expected a number, got 'nan'",
        ),
        (
            {"CHATPROXY_UPSTREAM_TIMEOUT": "inf"},
            "CHATPROXY_UPSTREAM_TIMEOUT: expected a number, got 'inf'",
        ),
        (
            {"CHATPROXY_UPSTREAM_CONNECT_TIMEOUT": "0"},
            "CHATPROXY_UPSTREAM_CONNECT_TIMEOUT: must be >= 0.001, got 0.0",
        ),
        (
            {"CHATPROXY_UPSTREAM_BASE_URL": "api.openai.com"},
            "CHATPROXY_UPSTREAM_BASE_URL: expected an http(s) URL, got 'api.openai.com'",
        ),
        (
            {"CHATPROXY_DATABASE_URL": "mysql://localhost/chat"},
            "CHATPROXY_DATABASE_URL: expected a postgresql:// URL",
        ),
        (
            {"CHATPROXY_LOG_LEVEL": "loud"},
            "CHATPROXY_LOG_LEVEL: expected one of debug, info, warning, error, critical, "
            "got 'loud'",
        ),
    ],
)
def test_bad_environment_values_name_the_variable(environ: dict[str, str], message: str) -> None:
    assert error_for(environ) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = true\n", "port: expected an integer, got True"),
        ("port = 8000.5\n", "port: expected an integer, got 8000.5"),
        ('port = "8001"\n', None),
        ("data_dir = 5\n", "data_dir: expected a string, got int"),
        ("retention_days = -3\n", "retention_days: must be >= 0, got -3"),
        ("upstream_timeout = false\n", "upstream_timeout: expected a number, got False"),
        ("colour = 'blue'\n", "colour: unknown key in the configuration file"),
        ("upstreams = 3\n", "upstreams: expected an array of tables ([[upstreams]])"),
        ("[[upstreams]]\nname = 'a'\nbase_url = 'ftp://x'\n",
         "upstreams[0].base_url: expected an http(s) URL, got 'ftp://x'"),
        ("[[upstreams]]\nname = 'a'\nbase_url = 'http://x'\nkey = 'k'\n",
         "upstreams[0].key: unknown key"),
        ("[[upstreams]]\nname = 'a'\nbase_url = 'http://x'\nmodels = 'llama*'\n",
         "upstreams[0].models: expected a list of strings"),
    ],
)
def test_bad_file_values_name_the_key(tmp_path: Path, text: str, message: str | None) -> None:
    environ = {"CHATPROXY_CONFIG": write(tmp_path, text)}
    if message is None:
        load_settings(environ)
    else:
        assert error_for(environ) == message


def test_a_missing_or_broken_file_names_the_variable(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    assert error_for({"CHATPROXY_CONFIG": missing}) == (
        f"CHATPROXY_CONFIG: cannot read {missing}: No such file or directory"
    )
    broken = write(tmp_path, "port = = 1\n")
    assert error_for({"CHATPROXY_CONFIG": broken}).startswith(
        f"CHATPROXY_CONFIG: {broken} is not valid TOML: "
    )


def test_upstreams_pick_by_model_pattern_and_the_default_serves_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, """
upstream_base_url = "https://api.openai.com/v1"
[[upstreams]]
name = "local"
base_url = "http://127.0.0.1:11434/v1/"
api_key_env = ""
models = ["llama*", "qwen*"]

[[upstreams]]
name = "other"
base_url = "https://other.example/v1"
api_key_env = "OTHER_KEY"
models = ["llama3-70b", "mistral-*"]
""")
    settings = load_settings({"CHATPROXY_CONFIG": path, "OTHER_KEY": "sk-other",
                              "OPENAI_API_KEY": "sk-openai"})
    local = Upstream("local", "http://127.0.0.1:11434/v1", None, ("llama*", "qwen*"))
    other = Upstream("other", "https://other.example/v1", "sk-other", ("llama3-70b", "mistral-*"))
    default = Upstream("default", "https://api.openai.com/v1", "sk-openai")
    assert settings.upstreams == (local, other)
    assert settings.upstream_for("llama3-70b") == local  # the first match wins
    assert settings.upstream_for("qwen2") == local
    assert settings.upstream_for("mistral-large") == other
    assert settings.upstream_for("gpt-4o") == default
    assert settings.upstream_for(None) == default
    assert settings.upstream_for(["llama"]) == default
    assert settings.all_upstreams() == (local, other, default)


def test_an_upstream_key_variable_that_is_unset_sends_no_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[[upstreams]]\nname = 'a'\nbase_url = 'http://a'\n"
                           "api_key_env = 'A_KEY'\nmodels = ['a*']\n")
    assert load_settings({"CHATPROXY_CONFIG": path}).upstreams[0].api_key is None


def test_models_table_longest_prefix_wins_and_defaults_cover_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, """
[defaults]
context_window = 1000
reserve_output_tokens = 100
encoding = "cl100k_base"

[models."gpt-4"]
context_window = 8192

[models."gpt-4o"]
context_window = 128000
encoding = "o200k_base"
""", "models.toml")
    table = ModelTable.load(path)
    assert (table.lookup("gpt-4o-mini").context_window, table.lookup("gpt-4o-mini").encoding) == (
        128000, "o200k_base")
    gpt4 = table.lookup("gpt-4-0613")
    assert (gpt4.context_window, gpt4.reserve_output_tokens, gpt4.encoding) == (
        8192, 100, "cl100k_base")
    assert table.lookup("claude").context_window == 1000
    assert table.lookup(None).context_window == 1000


def test_the_shipped_models_table_loads() -> None:
    root = Path(__file__).resolve().parent.parent
    table = ModelTable.load(str(root / "config" / "models.toml"))
    assert table.lookup("gpt-4o-2024-08-06").encoding == "o200k_base"
    assert table.lookup("some-unknown-model") == table.defaults


def test_a_bad_models_table_names_the_entry(tmp_path: Path) -> None:
    path = write(tmp_path, '[models."gpt-4"]\ncontext_window = -1\n', "models.toml")
    with pytest.raises(ConfigError) as caught:
        ModelTable.load(path)
    assert str(caught.value) == 'models."gpt-4".context_window: expected a non-negative integer'


def test_unknown_chatproxy_variables_are_named_with_the_closest_known_one() -> None:
    from proxy.configreport import unknown_variables

    environ = {
        "CHATPROXY_PROT": "8080", "CHATPROXY_DATADIR": "/srv", "CHATPROXY_XYZZY": "1",
        "CHATPROXY_PORT": "8080", "CHATPROXY_CONFIG": "x.toml",
        "CHATPROXY_TEST_DATABASE_URL": "postgresql://t", "OPENAI_API_KEY": "k", "PROT": "1",
    }
    assert unknown_variables(environ) == [
        "CHATPROXY_DATADIR is not a chatproxy setting and is ignored; "
        "did you mean CHATPROXY_DATA_DIR?",
        "CHATPROXY_PROT is not a chatproxy setting and is ignored; did you mean CHATPROXY_PORT?",
        "CHATPROXY_XYZZY is not a chatproxy setting and is ignored",
    ]
    assert unknown_variables({f.env: "1" for f in FIELDS}) == []


def test_upstreams_meant_to_have_a_key_and_without_one_are_named(tmp_path: Path) -> None:
    from proxy.configreport import keyless_upstreams

    path = write(tmp_path, """
[[upstreams]]
name = "local"
base_url = "http://127.0.0.1:11434/v1"
api_key_env = ""
models = ["llama*"]

[[upstreams]]
name = "router"
base_url = "https://router.example/v1"
api_key_env = "ROUTER_KEY"
models = ["anthropic/*"]
""")
    assert keyless_upstreams(load_settings({"CHATPROXY_CONFIG": path})) == [
        "router (ROUTER_KEY is unset)",
        "default (set CHATPROXY_UPSTREAM_API_KEY or OPENAI_API_KEY)",
    ]
    assert keyless_upstreams(load_settings({
        "CHATPROXY_CONFIG": path, "ROUTER_KEY": "k1", "OPENAI_API_KEY": "k2"})) == []
    assert keyless_upstreams(load_settings({"CHATPROXY_UPSTREAM_API_KEY": "k"})) == []
