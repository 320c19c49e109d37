"""The proxy the environment names for an upstream: `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and
`NO_PROXY`, read once when the settings are built (proxy/config.py), as curl and httpx read them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit


def environment_proxy(
    base_url: str, environ: Mapping[str, str], checked: Callable[[str, str], str | None]
) -> str | None:
    """The proxy the environment names for `base_url`, read as curl and httpx read it.

    `https_proxy` or `http_proxy` by the URL's scheme, else `all_proxy`; each variable in lower
    case if set, else in upper case, and an empty value means none. `no_proxy` lists the hosts
    reached directly: `*` for all, a name for itself and its subdomains (a leading `.` or `*.`
    changes nothing), an address or a CIDR block for the addresses in it, `:port` after any of
    them to match that port only. `checked(variable, value)` validates the URL found.
    """
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if _bypassed((parts.hostname or "").lower(), port, _variable(environ, "no_proxy")[1]):
        return None
    for name in (f"{parts.scheme}_proxy", "all_proxy"):
        variable, value = _variable(environ, name)
        if value.strip():
            return checked(variable, value)
    return None


def _variable(environ: Mapping[str, str], name: str) -> tuple[str, str]:
    if name in environ:
        return name, environ[name]
    return name.upper(), environ.get(name.upper(), "")


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy.lower().replace(",", " ").split():
        if entry == "*":
            return True
        name, wanted = entry, ""
        if entry.startswith("["):  # [::1] or [::1]:8080
            name, _, rest = entry[1:].partition("]")
            wanted = rest.removeprefix(":")
        elif entry.count(":") == 1:  # host:port (a bare IPv6 address has more colons)
            name, wanted = entry.split(":")
        if wanted and wanted != str(port):
            continue
        name = name.removeprefix("*").removeprefix(".")
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass  # a name: never matches an address (nothing is resolved)
        elif host == name or host.endswith("." + name):
            return True
    return False
