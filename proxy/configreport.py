"""What the settings say about themselves: the README's configuration table, a warning for a
`CHATPROXY_*` variable that is no setting (a typo), and the upstreams left without a key.

`python -m proxy.configreport` prints the table; `tests/test_readme.py` keeps the README's
copy equal.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from proxy.config import FIELDS, Field, Settings

# `CHATPROXY_*` variables that are not settings but are read all the same.
OTHER_VARIABLES = frozenset({
    "CHATPROXY_CONFIG",  # the TOML file (above)
    "CHATPROXY_TEST_DATABASE_URL",  # the test suite's PostgreSQL server (tests/conftest.py)
})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One message per `CHATPROXY_*` variable chatproxy does not read (a typo, most likely),
    naming the closest known one when there is one."""
    known = {spec.env for spec in FIELDS} | OTHER_VARIABLES
    # Compared without the shared prefix, which would make every name look close.
    suffixes = sorted(name.removeprefix("CHATPROXY_") for name in known)
    messages = []
    for name in sorted(environ):
        if not name.startswith("CHATPROXY_") or name in known:
            continue
        close = difflib.get_close_matches(name.removeprefix("CHATPROXY_"), suffixes, n=1)
        hint = f"; did you mean CHATPROXY_{close[0]}?" if close else ""
        messages.append(f"{name} is not a chatproxy setting and is ignored{hint}")
    return messages


def keyless_upstreams(settings: Settings) -> list[str]:
    """The upstreams meant to get a key that have none, each with what would give it one.

    The default upstream always is; an `[[upstreams]]` entry is when its `api_key_env` names a
    variable (an empty `api_key_env` says that upstream needs no key).
    """
    missing = [f"{u.name} ({u.key_env} is unset)"
               for u in settings.upstreams if u.key_env and not u.api_key]
    if not settings.upstream_api_key:
        missing.append("default (set CHATPROXY_UPSTREAM_API_KEY or OPENAI_API_KEY)")
    return missing


def _shown(spec: Field) -> str:
    if spec.key == "upstream_api_key":
        return "`$OPENAI_API_KEY`"
    if spec.key == "summary_prompt":
        return "a built-in prompt (`proxy/config.py`)"
    if spec.default is None:
        return "unset"
    if isinstance(spec.default, float) and spec.default.is_integer():
        return f"`{int(spec.default)}`"
    return f"`{spec.default}`"


def reference_table() -> str:
    """The README's configuration reference, generated from FIELDS (a test keeps them equal)."""
    rows = [
        "| variable | TOML key | default | meaning |",
        "|---|---|---|---|",
        "| `CHATPROXY_CONFIG` | | `config/chatproxy.toml` when present | the TOML file to read |",
    ]
    rows += [f"| `{s.env}` | `{s.key}` | {_shown(s)} | {s.doc} |" for s in FIELDS]
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_table())
