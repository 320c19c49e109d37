"""Network doubles for the upstream transport's guard rails: a real HTTP proxy, and the fake
upstream of tests/fault_helpers.py speaking TLS under a test CA.

`ForwardProxy` is a small but real HTTP proxy on 127.0.0.1, in a thread with its own event loop
(so a `chatproxy serve` subprocess can use it as well as an app in the test's loop): `CONNECT`
opens a tunnel, a request in absolute form (`POST http://host/path`) is forwarded in origin form.
It resolves the names in `hosts` itself, so an upstream named there (`upstream.test`) can only
be reached through it. `seen` records each request line it handled.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from urllib.parse import urlsplit

import trustme

from tests.fault_helpers import FakeUpstream


class ForwardProxy:
    def __init__(self, hosts: dict[str, str] | None = None) -> None:
        self.hosts = hosts or {}
        self.seen: list[str] = []
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop)
        self._server = started.result(10)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _address(self, host: str) -> str:
        return self.hosts.get(host, host)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        pumps: list[asyncio.Task[None]] = []
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if method == "CONNECT":
                self.seen.append(f"CONNECT {target}")
                host, port = target.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(self._address(host),
                                                                     int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                pumps.append(asyncio.create_task(_pump(up_reader, writer)))
                await _pump(reader, up_writer)
                return
            await self._forward(head, reader, writer, pumps)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # the proxy is closing
        finally:
            for pump in pumps:
                pump.cancel()
            writer.close()
            self._tasks.discard(task)

    async def _forward(self, head: bytes, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, pumps: list[asyncio.Task[None]]) -> None:
        """Requests in absolute form, one after another, to the origin the first one named."""
        up_writer: asyncio.StreamWriter | None = None
        origin = None
        while True:
            line, _, rest = head.partition(b"\r\n")
            method, target, version = line.decode("latin-1").split(" ")
            self.seen.append(f"{method} {target}")
            url = urlsplit(target)
            if up_writer is None:
                origin = (url.hostname, url.port)
                up_reader, up_writer = await asyncio.open_connection(
                    self._address(url.hostname or ""), url.port or 80)
                pumps.append(asyncio.create_task(_pump(up_reader, writer)))
            assert (url.hostname, url.port) == origin, "one origin per proxied connection"
            headers = [h for h in rest.split(b"\r\n") if h and not h.lower().startswith(b"proxy-")]
            length = next((int(h.split(b":", 1)[1]) for h in headers
                           if h.lower().startswith(b"content-length:")), 0)
            body = await reader.readexactly(length)
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            up_writer.write(f"{method} {path} {version}\r\n".encode()
                            + b"\r\n".join(headers) + b"\r\n\r\n" + body)
            head = await reader.readuntil(b"\r\n\r\n")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def tls_upstream(ca: trustme.CA, directory: Path, *names: str) -> FakeUpstream:
    """The fake upstream over HTTPS, its certificate (for `names`) signed by `ca`."""
    pem = directory / "upstream.pem"
    ca.issue_cert(*(names or ("127.0.0.1",))).private_key_and_cert_chain_pem.write_to_path(
        str(pem))
    return FakeUpstream(ssl_certfile=str(pem))


def named(upstream: FakeUpstream, host: str) -> str:
    """The upstream's base URL under another host name (one that `ForwardProxy` resolves)."""
    return upstream.base_url.replace("127.0.0.1", host)


def ca_file(ca: trustme.CA, directory: Path) -> str:
    """The CA's certificate as a PEM file: a CA bundle."""
    path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)
