"""`chatproxy doctor`: where the data lives, whether the database and each upstream answer.

It changes nothing: it never creates an embedded cluster (it joins an existing one, as every CLI
command does), applies no migration, and sends each upstream one `GET /models` with that
upstream's key. It never prints a key, nor an upstream's answer body (an error body may quote part
of the key). Each check is one line, `ok` or `FAIL`; the exit status is 1 when any failed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TextIO

import asyncpg
import httpx

from proxy import db
from proxy.config import ConfigError, Settings, Upstream, config_path
from proxy.migrate import MigrationError, pending

TIMEOUT = 5.0  # seconds for the database and for each upstream


@dataclass
class Report:
    out: TextIO = field(default_factory=lambda: sys.stdout)
    failed: int = 0

    def info(self, label: str, text: str) -> None:
        first, *rest = text.splitlines()
        print(f"{label:<9} {first}", file=self.out)
        for line in rest:
            print(" " * 10 + line.strip(), file=self.out)

    def ok(self, text: str) -> None:
        self.info("ok", text)

    def fail(self, text: str) -> None:
        self.failed += 1
        self.info("FAIL", text)


async def check(settings: Settings, environ: Mapping[str, str]) -> int:
    """Print one line per fact and per check; the exit status: 1 when a check failed."""
    report = Report()
    path = config_path(environ)
    report.info("config", str(path.resolve()) if path else "no file: defaults and environment")
    _model_table(settings, report)
    report.info("data", db.describe(settings))
    await _database(settings, report)
    upstreams = settings.all_upstreams()
    async with httpx.AsyncClient(timeout=TIMEOUT, trust_env=False,
                                 follow_redirects=False) as client:
        answers = await asyncio.gather(*(_models(client, u) for u in upstreams))
    for upstream, (good, text) in zip(upstreams, answers, strict=True):
        key = _key(settings, upstream)
        line = f"upstream {upstream.name} at {upstream.base_url} ({key}): {text}"
        if good:
            report.ok(line)
        else:
            report.fail(line)
    problems = f"{report.failed} check{'s' if report.failed != 1 else ''} failed"
    print(problems if report.failed else "everything answers", file=report.out)
    return 1 if report.failed else 0


def _model_table(settings: Settings, report: Report) -> None:
    from proxy.tokens import ModelTable

    try:
        ModelTable.load(settings.models_file)
    except ConfigError as exc:
        report.fail(f"model table: {exc}")
    else:
        report.ok(f"model table {settings.models_file} loads")


async def _database(settings: Settings, report: Report) -> None:
    try:
        url = await asyncio.to_thread(db.database_url, settings, create=False)
    except db.NoDatabase as exc:
        report.fail(str(exc))
        return
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        # Its log says why: pg_ctl's output is in $CHATPROXY_DATA_DIR/pg/log.
        report.fail(f"the embedded PostgreSQL did not start ({type(exc).__name__}); see "
                    f"{db.pgdata_of(settings.data_dir) / 'log'}")
        return
    try:
        conn = await asyncpg.connect(url, timeout=TIMEOUT)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        report.fail(f"database does not answer: {type(exc).__name__}: {exc}")
        return
    try:
        version = await conn.fetchval("SHOW server_version")
        left = await pending(conn)
    except (MigrationError, asyncpg.PostgresError) as exc:
        report.fail(f"database answers, but its migrations cannot be read: {exc}")
        return
    finally:
        await conn.close()
    waiting = (f"{len(left)} pending, applied at the next `chatproxy serve` or `chatproxy "
               f"migrate`: {', '.join(left)}") if left else "none pending"
    report.ok(f"database answers (PostgreSQL {version}); migrations: {waiting}")


def _key(settings: Settings, upstream: Upstream) -> str:
    """Where its key comes from, never the key."""
    if upstream.api_key:
        return "with its key"
    if upstream.key_env:
        return f"no key: {upstream.key_env} is unset"
    if upstream in settings.upstreams:
        return "no key: api_key_env is empty"
    return "no key: set CHATPROXY_UPSTREAM_API_KEY or OPENAI_API_KEY"


async def _models(client: httpx.AsyncClient, upstream: Upstream) -> tuple[bool, str]:
    """Whether `GET /models` answers 200, and what to say about it."""
    headers = {"Authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
    try:
        response = await client.get(upstream.base_url + "/models", headers=headers)
    except httpx.TimeoutException:
        return False, f"GET /models got no answer within {TIMEOUT:g} s"
    except httpx.HTTPError as exc:
        reason = f" ({exc})" if str(exc) else ""  # the transport's words: no URL, no header
        return False, f"GET /models failed: {type(exc).__name__}{reason}"
    if response.status_code != 200:
        refused = " (the key was refused)" if response.status_code in (401, 403) else ""
        return False, f"GET /models answered {response.status_code}{refused}"
    try:
        listed = response.json().get("data")
    except (ValueError, AttributeError):
        listed = None
    count = ""
    if isinstance(listed, list):
        count = f", {len(listed)} model{'' if len(listed) == 1 else 's'}"
    return True, f"GET /models answered 200{count}"
