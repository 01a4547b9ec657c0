"""An HTTP/2 front for the fakes: hypercorn (an HTTP/2 server that is not ours) relaying
each request to a fake on loopback over HTTP/1.1, so every Plan works over h2 too.

A stream the client resets reaches the ASGI app as `http.disconnect`; the front then
closes its request to the fake, which records the disconnect as it does for HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from hypercorn.asyncio import serve
from hypercorn.config import Config

_HOP = {"host", "connection", "transfer-encoding", "content-length"}


@dataclass
class Seen:
    """One request as the front saw it."""

    http_version: str
    client: tuple[str, int]  # the client's address: which connection carried it
    path: str


@dataclass
class H2Front:
    """The ASGI app: relays to `target` (the fake's base URL) and records each request."""

    target: str
    seen: list[Seen] = field(default_factory=list)
    session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """ASGI entry point."""
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.seen.append(Seen(scope["http_version"], tuple(scope["client"]), scope["path"]))
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {
            k.decode(): v.decode() for k, v in scope["headers"] if k.decode().lower() not in _HOP
        }
        assert self.session is not None
        async with self.session.post(
            self.target + scope["path"], data=body, headers=headers, auto_decompress=False
        ) as resp:
            await send(
                {
                    "type": "http.response.start",
                    "status": resp.status,
                    "headers": [
                        (k.lower().encode(), v.encode())
                        for k, v in resp.headers.items()
                        if k.lower() not in _HOP
                    ],
                }
            )
            pump = asyncio.ensure_future(self._pump(resp, send))
            gone = asyncio.ensure_future(self._disconnected(receive))
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            for task in (pump, gone):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump  # its error (the fake reset the connection) reaches hypercorn

    @staticmethod
    async def _pump(resp: aiohttp.ClientResponse, send: Any) -> None:
        async for chunk in resp.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _disconnected(receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


@contextlib.asynccontextmanager
async def h2_front(
    target: str, *, max_streams: int = 100, tls: tuple[str, str] | None = None
) -> AsyncIterator[tuple[H2Front, str]]:
    """Serve an H2Front on a loopback port; yield it and its base URL.

    `max_streams`: the server's SETTINGS_MAX_CONCURRENT_STREAMS. `tls`: (certfile,
    keyfile) to serve https with ALPN h2; otherwise h2c (prior knowledge).
    """
    front = H2Front(target.rstrip("/"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # clients queue until hypercorn accepts: no wait for it to start
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) it now
    config.h2_max_concurrent_streams = max_streams
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    if tls:
        config.certfile, config.keyfile = tls
        config.alpn_protocols = ["h2"]
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        front.session = session
        server = asyncio.ensure_future(serve(front, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
        scheme = "https" if tls else "http"
        try:
            yield front, f"{scheme}://127.0.0.1:{port}"
        finally:
            stop.set()
            await server
