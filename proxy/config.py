"""Settings: the TOML file plus `CHATPROXY_*` environment overrides, validated once.

`load_settings(environ)` is the only way to build `Settings`; it reads an injectable environ so
tests never touch `os.environ`. Every bad value raises `ConfigError` with a one-line message that
names the key, and the CLI prints that line and exits.

`FIELDS` is the single table of settings: the README's configuration reference is checked
against it by a test, so the two cannot drift.
"""

from __future__ import annotations

import fnmatch
import math
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy import proxyenv
from proxy.schemas import MAX_HISTORY_MESSAGES


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the key."""


@dataclass(frozen=True)
class Field:
    key: str
    default: Any
    kind: Callable[[str, Any], Any]
    doc: str

    @property
    def env(self) -> str:
        return "CHATPROXY_" + self.key.upper()


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
    return value


def _opt_str(key: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    return _str(key, value)


def _int(low: int, high: int | None = None) -> Callable[[str, Any], int]:
    def parse(key: str, value: Any) -> int:
        # Only whole numbers: a TOML float or a bool is refused, never truncated.
        number: int | None = None
        if isinstance(value, int | str) and not isinstance(value, bool):
            try:
                number = int(value)
            except ValueError:
                number = None
        if number is None:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if number < low or (high is not None and number > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ConfigError(f"{key}: must be {bound}, got {number}")
        return number

    return parse


def _float(low: float) -> Callable[[str, Any], float]:
    def parse(key: str, value: Any) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if number < low:
            raise ConfigError(f"{key}: must be >= {low}, got {number}")
        return number

    return parse


def _url(key: str, value: Any) -> str:
    text = _str(key, value).rstrip("/")
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 (a port that is not a number raises)
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key}: expected an http(s) URL, got {text!r}")
    return text


def _db_url(key: str, value: Any) -> str | None:
    text = _opt_str(key, value)
    if text is not None and urlsplit(text).scheme not in ("postgres", "postgresql"):
        raise ConfigError(f"{key}: expected a postgresql:// URL")
    return text


def _proxy(key: str, value: Any) -> str:
    """A proxy URL, or "" for none; `host:port` alone means `http://host:port`, as curl reads it.

    The message never repeats the value: a proxy URL may carry a password."""
    text = _str(key, value).strip()
    if not text:
        return ""
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected an http:// or https:// proxy URL (socks is not "
                          "supported)")
    return text


def _ca_bundle(key: str, value: Any) -> str | None:
    """A PEM file of CA certificates, checked by loading it now rather than at the first request."""
    path = _opt_str(key, value)
    if path is not None:
        try:
            ssl.create_default_context(cafile=path)
        except FileNotFoundError:
            raise ConfigError(f"{key}: no such file: {path}") from None
        except ssl.SSLError:  # before OSError, which it subclasses
            raise ConfigError(f"{key}: {path} holds no PEM certificate") from None
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    return path


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

SUMMARY_PROMPT = (
    "You keep the running summary of a conversation between a user and an assistant. The "
    "assistant will continue the conversation from your summary once the earlier messages are "
    "no longer shown to it. Fold the new messages into the previous summary, if there is one, "
    "and answer with the new summary alone, as plain text in the conversation's language. Keep "
    "every fact, decision, name, number, preference and commitment, what was asked of tools "
    "and what they answered, and the questions still open; leave out greetings and repetition. "
    "Be concise: at most about 400 words."
)


def _log_level(key: str, value: Any) -> str:
    text = _str(key, value).lower()
    if text not in LOG_LEVELS:
        raise ConfigError(f"{key}: expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text


FIELDS: tuple[Field, ...] = (
    Field("database_url", None, _db_url,
          "a PostgreSQL URL; unset means an embedded cluster in `$CHATPROXY_DATA_DIR/pg`"),
    Field("data_dir", "./data", _str, "where the embedded cluster lives"),
    Field("host", "127.0.0.1", _str, "listen address"),
    Field("port", 8000, _int(1, 65535), "listen port"),
    Field("upstream_base_url", "https://api.openai.com/v1", _url,
          "the default upstream, OpenAI-compatible"),
    Field("upstream_api_key", None, _opt_str,
          "the key sent upstream; a client's key never goes upstream"),
    Field("admin_key", None, _opt_str, "bearer key for `/admin/*`; unset: the admin API is 404"),
    Field("models_file", "config/models.toml", _str, "the model table"),
    Field("default_max_history_messages", 20, _int(0, MAX_HISTORY_MESSAGES),
          "for sessions created without their own value"),
    Field("retention_days", 7, _int(0), "inactive sessions are deleted after this; 0 keeps all"),
    Field("max_stored_messages", 0, _int(0),
          "when > 0, older messages beyond this count per session are pruned"),
    Field("max_body_bytes", 10_485_760, _int(1024), "larger request bodies get 413"),
    Field("max_request_messages", 2048, _int(1), "more messages in one request get 400"),
    Field("upstream_connect_timeout", 10.0, _float(0.001), "seconds to connect upstream (502)"),
    Field("upstream_timeout", 600.0, _float(0.001),
          "seconds to wait for the next byte from the upstream (504)"),
    Field("upstream_proxy", None, _proxy,
          "HTTP proxy for the default upstream (`http://host:3128`); unset: `HTTPS_PROXY`, "
          "`HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` decide; empty: none"),
    Field("upstream_ca_bundle", None, _ca_bundle,
          "PEM file of the CAs the default upstream's certificate is checked against, instead "
          "of the system's"),
    Field("upstream_max_connections", 512, _int(0),
          "connections open at once to one upstream origin; a request that finds none free "
          "within the connect timeout gets 503 `upstream_busy`; 0: no cap"),
    Field("max_event_bytes", 16_777_216, _int(1024),
          "one streamed event from the upstream larger than this ends a session's stream "
          "with an error event"),
    Field("db_pool_size", 10, _int(1, 1000), "connections in each process's pool"),
    Field("db_acquire_timeout", 1.5, _float(0.01),
          "seconds to wait for a pool connection before answering 503"),
    Field("db_statement_timeout", 2.0, _float(0.01),
          "seconds one database statement of a request may take; past it (a hung database) "
          "503, and the connection is dropped"),
    Field("db_bulk_timeout", 300.0, _float(0.01),
          "the same for one statement of import, export, fork, merge, clear, pruning and the "
          "retention job"),
    Field("export_connections", 2, _int(1),
          "pool connections exports may hold at once, each only while it reads its session "
          "(the others wait their turn)"),
    Field("exports_per_user", 2, _int(1),
          "exports of one user read or sent at once by a process; one more gets 429"),
    Field("send_timeout", 60.0, _float(0.1),
          "seconds a response may wait on a client that reads nothing; then the connection "
          "is closed"),
    Field("shutdown_grace", 30.0, _float(0),
          "seconds in-flight requests get after SIGTERM or Ctrl-C; then they are cut"),
    Field("head_timeout", 10, _int(1),
          "seconds a connection has to send a whole request head, after opening or after its "
          "previous response; then it is closed (408 if part of a head came)"),
    Field("max_head_bytes", 65_536, _int(1024),
          "a larger request head (request line and headers) gets 431 and the connection closed"),
    Field("max_connections", 4096, _int(1),
          "open client connections per process; one more gets 503 and is closed (at most half "
          "the open-files limit)"),
    Field("summary_model", None, _opt_str,
          "the model that summarises messages a turn leaves out of the history (routed like "
          "any model); unset: no summaries"),
    Field("summary_prompt", SUMMARY_PROMPT, _str,
          "the summary model's instructions (the default asks for the facts, decisions, names "
          "and open questions a continuation needs)"),
    Field("log_level", "info", _log_level, "debug, info, warning, error or critical"),
)


@dataclass(frozen=True)
class Upstream:
    """One OpenAI-compatible upstream, the model-name patterns it serves, and how to reach it:
    `proxy` is the HTTP proxy its requests go through (None: straight to it), already resolved
    from the settings and the environment; `ca_bundle` replaces the system's CAs for it."""

    name: str
    base_url: str
    api_key: str | None
    models: tuple[str, ...] = ()
    proxy: str | None = None
    ca_bundle: str | None = None
    # An `[[upstreams]]` entry's `api_key_env` ("" when it sends no key); read only to say which
    # variable is missing, so two upstreams that behave alike still compare equal.
    key_env: str = field(default="", compare=False)

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    data_dir: str = "./data"
    host: str = "127.0.0.1"
    port: int = 8000
    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_api_key: str | None = None
    admin_key: str | None = None
    models_file: str = "config/models.toml"
    default_max_history_messages: int = 20
    retention_days: int = 7
    max_stored_messages: int = 0
    max_body_bytes: int = 10_485_760
    max_request_messages: int = 2048
    upstream_connect_timeout: float = 10.0
    upstream_timeout: float = 600.0
    upstream_proxy: str | None = None  # resolved by load_settings: a URL, or None for none
    upstream_ca_bundle: str | None = None
    upstream_max_connections: int = 512
    max_event_bytes: int = 16_777_216
    db_pool_size: int = 10
    db_acquire_timeout: float = 1.5
    db_statement_timeout: float = 2.0
    db_bulk_timeout: float = 300.0
    export_connections: int = 2
    exports_per_user: int = 2
    send_timeout: float = 60.0
    shutdown_grace: float = 30.0
    head_timeout: int = 10
    max_head_bytes: int = 65_536
    max_connections: int = 4096
    summary_model: str | None = None
    summary_prompt: str = SUMMARY_PROMPT
    log_level: str = "info"
    upstreams: tuple[Upstream, ...] = field(default=())

    @property
    def default_upstream(self) -> Upstream:
        return Upstream("default", self.upstream_base_url, self.upstream_api_key, (),
                        self.upstream_proxy, self.upstream_ca_bundle)

    def upstream_for(self, model: object) -> Upstream:
        """The first configured upstream whose pattern matches `model`, else the default."""
        if isinstance(model, str):
            for upstream in self.upstreams:
                if upstream.serves(model):
                    return upstream
        return self.default_upstream

    def all_upstreams(self) -> tuple[Upstream, ...]:
        return (*self.upstreams, self.default_upstream)


def _read_toml(path: Path, key: str) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{key}: {path} is not valid TOML: {exc}") from None


def _parse_upstreams(raw: Any, environ: Mapping[str, str]) -> tuple[Upstream, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("upstreams: expected an array of tables ([[upstreams]])")
    result = []
    for index, entry in enumerate(raw):
        where = f"upstreams[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(entry) - {"name", "base_url", "api_key_env", "models", "proxy",
                                "ca_bundle"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
        name = _str(f"{where}.name", entry.get("name"))
        base_url = _url(f"{where}.base_url", entry.get("base_url"))
        key_env = _str(f"{where}.api_key_env", entry.get("api_key_env", ""))
        models = entry.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ConfigError(f"{where}.models: expected a list of strings")
        api_key = environ.get(key_env) or None if key_env else None
        proxy = _proxy(f"{where}.proxy", entry["proxy"]) if "proxy" in entry else None
        ca_bundle = _ca_bundle(f"{where}.ca_bundle", entry.get("ca_bundle"))
        result.append(Upstream(name, base_url, api_key, tuple(models),
                               _resolved(proxy, base_url, environ), ca_bundle, key_env))
    return tuple(result)


# --- how to reach the upstreams ---------------------------------------------------------------


def _resolved(chosen: str | None, base_url: str, environ: Mapping[str, str]) -> str | None:
    """A proxy setting made final: unset defers to the environment, "" means none."""
    if chosen is not None:
        return chosen or None
    return environment_proxy(base_url, environ)


def environment_proxy(base_url: str, environ: Mapping[str, str]) -> str | None:
    """The proxy the environment names for `base_url` (proxy/proxyenv.py), checked as a setting."""
    return proxyenv.environment_proxy(base_url, environ, _proxy)


def _check_origins(settings: Settings) -> None:
    """Upstreams on one origin share its connections, so they must agree on how to reach it."""
    seen: dict[tuple[str, str | None, int], Upstream] = {}
    for upstream in settings.all_upstreams():
        parts = urlsplit(upstream.base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        first = seen.setdefault((parts.scheme, parts.hostname, port), upstream)
        if (first.proxy, first.ca_bundle) != (upstream.proxy, upstream.ca_bundle):
            raise ConfigError(
                f"upstreams: {first.name!r} and {upstream.name!r} are on one origin "
                f"({parts.scheme}://{parts.hostname}) but differ in proxy or ca_bundle"
            )


def config_path(environ: Mapping[str, str]) -> Path | None:
    """The TOML file settings are read from: CHATPROXY_CONFIG, else `config/chatproxy.toml` in
    the working directory when it exists, else none."""
    named = environ.get("CHATPROXY_CONFIG")
    if named:
        return Path(named)
    default = Path("config/chatproxy.toml")
    return default if default.is_file() else None


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Build Settings from the TOML file named by CHATPROXY_CONFIG and the environment."""
    path = config_path(environ)
    data: dict[str, Any] = _read_toml(path, "CHATPROXY_CONFIG") if path is not None else {}

    known = {f.key for f in FIELDS} | {"upstreams"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown key in the configuration file")

    values: dict[str, Any] = {}
    for spec in FIELDS:
        raw = data.get(spec.key, spec.default)
        name = spec.key
        if spec.env in environ:
            raw, name = environ[spec.env], spec.env
        elif spec.key == "upstream_api_key" and raw is None:
            raw, name = environ.get("OPENAI_API_KEY"), "OPENAI_API_KEY"
        values[spec.key] = spec.kind(name, raw) if raw is not None else None
    values["upstream_proxy"] = _resolved(values["upstream_proxy"], values["upstream_base_url"],
                                         environ)
    values["upstreams"] = _parse_upstreams(data.get("upstreams"), environ)
    settings = Settings(**values)
    _check_origins(settings)
    return settings
