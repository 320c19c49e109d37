"""Settings for reaching the upstreams: proxies (settings over environment, NO_PROXY), CA bundles,
the connection cap; bad values stop with a message naming the key and never the proxy's password.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from proxy.config import ConfigError, environment_proxy, load_settings

API = "https://api.openai.com/v1"
LOCAL = "http://127.0.0.1:11434/v1"


@pytest.fixture(autouse=True)
def _no_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/chatproxy.toml here: only what a test writes


def error_for(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    return str(caught.value)


@pytest.mark.parametrize(
    ("url", "environ", "proxy"),
    [
        (API, {}, None),
        (API, {"HTTPS_PROXY": "http://p:3128"}, "http://p:3128"),
        (API, {"HTTP_PROXY": "http://p:3128"}, None),  # the scheme picks the variable
        (LOCAL, {"HTTP_PROXY": "http://p:3128"}, "http://p:3128"),
        (API, {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:1"},
         "http://lower:1"),
        (API, {"https_proxy": "", "HTTPS_PROXY": "http://upper:1"}, None),  # lower case wins
        (API, {"ALL_PROXY": "http://all:1"}, "http://all:1"),
        (API, {"ALL_PROXY": "http://all:1", "HTTPS_PROXY": "http://p:1"}, "http://p:1"),
        (API, {"HTTPS_PROXY": "p.internal:3128"}, "http://p.internal:3128"),
        (API, {"HTTPS_PROXY": "https://p:443"}, "https://p:443"),
        (API, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, None),
        (API, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "openai.com"}, None),
        (API, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".openai.com"}, None),
        (API, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*.openai.com"}, None),
        (API, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "API.OpenAI.com:443"}, None),
        (API, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.openai.com:8443"}, "http://p:1"),
        (API, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "penai.com,i.openai"}, "http://p:1"),
        (API, {"HTTPS_PROXY": "http://p:1", "no_proxy": "", "NO_PROXY": "*"}, "http://p:1"),
        (LOCAL, {"HTTP_PROXY": "http://p:1", "NO_PROXY": "localhost, 127.0.0.0/8"}, None),
        (LOCAL, {"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8"}, "http://p:1"),
        (LOCAL, {"HTTP_PROXY": "http://p:1", "NO_PROXY": "127.0.0.1:11434"}, None),
        (LOCAL, {"HTTP_PROXY": "http://p:1", "NO_PROXY": "localhost"}, "http://p:1"),
        ("http://[::1]:8080/v1", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "::1"}, None),
        ("http://[::1]:8080/v1", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "[::1]:8080"}, None),
        ("http://[::1]:8080/v1", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "[::1]:9"},
         "http://p:1"),
    ],
)
def test_the_environment_names_the_proxy(
    url: str, environ: dict[str, str], proxy: str | None
) -> None:
    assert environment_proxy(url, environ) == proxy


def test_the_default_upstream_follows_the_environment_unless_its_setting_is_given() -> None:
    env = {"HTTPS_PROXY": "http://corp:3128"}
    assert load_settings(env).upstream_proxy == "http://corp:3128"
    assert load_settings(env).default_upstream.proxy == "http://corp:3128"
    assert load_settings({**env, "CHATPROXY_UPSTREAM_PROXY": "http://mine:1"}).upstream_proxy == (
        "http://mine:1")
    assert load_settings({**env, "CHATPROXY_UPSTREAM_PROXY": ""}).upstream_proxy is None
    assert load_settings({}).upstream_proxy is None


def test_each_upstream_has_its_own_proxy_and_ca_bundle(tmp_path: Path) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    config = tmp_path / "chatproxy.toml"
    config.write_text(
        'upstream_ca_bundle = "ca.pem"\n'
        "[[upstreams]]\n"
        'name = "local"\nbase_url = "http://127.0.0.1:11434/v1"\nproxy = ""\n'
        "[[upstreams]]\n"
        'name = "corp"\nbase_url = "https://llm.corp.example/v1"\n'
        f'proxy = "corp-proxy:8080"\nca_bundle = "{bundle}"\n'
        "[[upstreams]]\n"
        'name = "cloud"\nbase_url = "https://cloud.example/v1"\n'
    )
    settings = load_settings({"CHATPROXY_CONFIG": str(config), "HTTP_PROXY": "http://env:1",
                              "HTTPS_PROXY": "http://env:2"})
    assert [(u.name, u.proxy, u.ca_bundle) for u in settings.all_upstreams()] == [
        ("local", None, None),  # "" is no proxy, whatever the environment says
        ("corp", "http://corp-proxy:8080", str(bundle)),
        ("cloud", "http://env:2", None),  # no key: the environment decides, system CAs
        ("default", "http://env:2", "ca.pem"),
    ]


def test_upstreams_on_one_origin_must_be_reached_alike(tmp_path: Path) -> None:
    config = tmp_path / "chatproxy.toml"
    config.write_text(
        "[[upstreams]]\n"
        'name = "a"\nbase_url = "https://api.openai.com:443/other"\nproxy = "http://p:1"\n'
    )
    assert error_for({"CHATPROXY_CONFIG": str(config)}) == (
        "upstreams: 'a' and 'default' are on one origin (https://api.openai.com) but differ "
        "in proxy or ca_bundle"
    )
    same = {"CHATPROXY_CONFIG": str(config), "CHATPROXY_UPSTREAM_PROXY": "http://p:1"}
    assert load_settings(same).upstreams[0].proxy == "http://p:1"


def test_the_connection_cap_is_a_whole_number_from_zero() -> None:
    assert load_settings({}).upstream_max_connections == 512
    assert load_settings({"CHATPROXY_UPSTREAM_MAX_CONNECTIONS": "0"}).upstream_max_connections == 0
    assert error_for({"CHATPROXY_UPSTREAM_MAX_CONNECTIONS": "-1"}) == (
        "CHATPROXY_UPSTREAM_MAX_CONNECTIONS: must be >= 0, got -1")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CHATPROXY_UPSTREAM_PROXY": "socks5://user:s3cret@p:1080"},
         "CHATPROXY_UPSTREAM_PROXY: expected an http:// or https:// proxy URL (socks is not "
         "supported)"),
        ({"HTTPS_PROXY": "socks5h://user:s3cret@p:1080"},
         "HTTPS_PROXY: expected an http:// or https:// proxy URL (socks is not supported)"),
        ({"all_proxy": "http://"},
         "all_proxy: expected an http:// or https:// proxy URL (socks is not supported)"),
        ({"CHATPROXY_UPSTREAM_BASE_URL": "http://host:port/v1", "HTTP_PROXY": "http://p:1"},
         "CHATPROXY_UPSTREAM_BASE_URL: expected an http(s) URL, got 'http://host:port/v1'"),
        ({"CHATPROXY_UPSTREAM_CA_BUNDLE": "/nowhere/ca.pem"},
         "CHATPROXY_UPSTREAM_CA_BUNDLE: no such file: /nowhere/ca.pem"),
    ],
)
def test_bad_values_name_the_variable_and_never_the_password(
    environ: dict[str, str], message: str
) -> None:
    assert error_for(environ) == message


def test_a_proxy_the_upstreams_never_use_is_not_checked() -> None:
    # Only https upstreams: an HTTP_PROXY other tools use is none of chatproxy's business.
    assert load_settings({"HTTP_PROXY": "socks5://p:1080"}).upstream_proxy is None


def test_a_ca_bundle_must_hold_a_certificate(tmp_path: Path) -> None:
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    assert error_for({"CHATPROXY_UPSTREAM_CA_BUNDLE": str(not_pem)}) == (
        f"CHATPROXY_UPSTREAM_CA_BUNDLE: {not_pem} holds no PEM certificate")
    config = tmp_path / "chatproxy.toml"
    config.write_text(f'[[upstreams]]\nname = "a"\nbase_url = "https://a.example"\n'
                      f'ca_bundle = "{not_pem}"\n')
    assert error_for({"CHATPROXY_CONFIG": str(config)}) == (
        f"upstreams[0].ca_bundle: {not_pem} holds no PEM certificate")
