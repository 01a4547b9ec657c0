"""HTTP/2 to providers: many streams over one connection, under the official SDKs.

An httpx2 transport (the HTTP layer the SDKs build on) over the `h2` state machine.
Each connection is read by its protocol's `data_received`, with no task and no lock:
frames go straight to their stream's buffer, so a slow reader never holds up another
stream (httpcore's HTTP/2 reads every stream of a connection behind one lock; see
docs/performance.md). Closing a response before its end resets only that stream
(RST_STREAM CANCEL), which is the provider's cue to stop generating.

`https://` origins must agree to h2 by ALPN; `http://` origins are spoken to in h2
with prior knowledge (h2c), as on loopback. A stream the server refused without
processing it (GOAWAY, REFUSED_STREAM) is sent again on another connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import h2.exceptions
import httpx2

from providers.h2_connection import (
    ACK_EVERY,
    CONNECTION_WINDOW,
    STREAM_WINDOW,
    Connection,
    Refused,
    Stream,
)

_ATTEMPTS = 3  # a stream refused unprocessed is sent again, at most this often


class _Body(httpx2.AsyncByteStream):
    """A response body: the stream's buffered DATA, read in the order it arrived.

    Its own iterator rather than an async generator: one object less per open stream,
    and no entry in the event loop's set of live async generators.
    """

    __slots__ = ("stream", "timeout")

    def __init__(self, stream: Stream, timeout: float | None) -> None:
        self.stream = stream
        self.timeout = timeout

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        """Everything that arrived since the last read, as one piece."""
        stream = self.stream
        conn = stream.conn
        while True:
            chunks = stream.chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                stream.chunks = []
                if stream.unacked >= conn.pool.ack_every:  # the window goes back in batches
                    size, stream.unacked = stream.unacked, 0
                    conn.ack(stream, size)
                return data
            if stream.error is not None:
                conn.release(stream)
                raise stream.error
            if stream.ended:
                conn.release(stream)
                raise StopAsyncIteration
            await stream.wait(self.timeout)

    async def aclose(self) -> None:
        """Close the response: an unfinished stream is reset, its slot freed."""
        self.stream.conn.release(self.stream)


class H2Transport(httpx2.AsyncBaseTransport):
    """Sends every request over HTTP/2, sharing connections up to `max_streams` each."""

    def __init__(
        self,
        *,
        max_streams: int = 100,
        keepalive_expiry: float = 5.0,
        verify: ssl.SSLContext | bool = True,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
    ) -> None:
        """`max_streams`: per connection (the server's own limit also applies);
        `*_window`: how far the server may send ahead of our reading."""
        self.max_streams = max_streams
        self.keepalive_expiry = keepalive_expiry
        self.stream_window = stream_window
        self.connection_window = connection_window
        # streams holding back acknowledgements must not exhaust the connection's window
        self.ack_every = max(1, min(ACK_EVERY, connection_window // (2 * max_streams)))
        self._verify = verify
        self._ssl: ssl.SSLContext | None = None
        self._pools: dict[tuple[bytes, bytes, int], list[Connection]] = {}

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx2.create_ssl_context(verify=self._verify)
            self._ssl.set_alpn_protocols(["h2"])
        return self._ssl

    def forget(self, conn: Connection) -> None:
        """Take a closed or closing connection out of the pool."""
        pool = self._pools.get(conn.origin)
        if pool and conn in pool:
            pool.remove(conn)

    async def _connection(
        self, origin: tuple[bytes, bytes, int], connect_timeout: float | None
    ) -> Connection:
        """A connection with room for one more stream, reserved for the caller."""
        pool = self._pools.setdefault(origin, [])
        for conn in pool:
            if conn.usable():
                break
        else:
            conn = Connection(self, origin)
            pool.append(conn)
            conn.loop.create_task(self._open(conn, connect_timeout))
        conn.reserved += 1
        if conn.idle is not None:
            conn.idle.cancel()
            conn.idle = None
        try:
            await asyncio.shield(conn.opened)
        except BaseException:
            conn.reserved -= 1
            raise
        return conn

    async def _open(self, conn: Connection, connect_timeout: float | None) -> None:
        """Connect `conn` (TCP, then TLS with ALPN h2 for https)."""
        scheme, host, port = conn.origin
        tls = scheme == b"https"
        try:
            async with asyncio.timeout(connect_timeout):
                sock, _ = await conn.loop.create_connection(
                    lambda: conn,
                    host.decode("ascii"),
                    port,
                    ssl=self._ssl_context() if tls else None,
                )
                chosen = sock.get_extra_info("ssl_object").selected_alpn_protocol() if tls else "h2"
                if chosen != "h2":
                    raise httpx2.ConnectError(
                        f"{host.decode()} does not offer HTTP/2 (ALPN chose {chosen!r}); "
                        "set http2 = false for this provider"
                    )
                # the server's preface (its SETTINGS) comes first: its stream limit
                await asyncio.shield(conn.opened)
        except BaseException as exc:
            self.forget(conn)
            if conn.sock is not None:
                conn.sock.abort()
            if isinstance(exc, TimeoutError):
                error: BaseException = httpx2.ConnectTimeout(f"connecting to {host.decode()}")
            elif isinstance(exc, OSError | ssl.SSLError):
                error = httpx2.ConnectError(str(exc))
                error.__cause__ = exc
            else:
                error = exc
            if not conn.opened.done():
                conn.opened.set_exception(error)
                conn.opened.exception()
            if not isinstance(exc, Exception):
                raise
            return
        if conn.reserved == 0 and conn.idle is None:
            conn.idle = conn.loop.call_later(self.keepalive_expiry, conn.expire)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send `request` on a shared connection and return as soon as its headers arrive."""
        url = request.url
        if url.raw_scheme not in (b"http", b"https"):
            raise httpx2.UnsupportedProtocol(f"HTTP/2 transport: unsupported URL {url}")
        origin = (
            url.raw_scheme,
            url.raw_host,
            url.port or (443 if url.raw_scheme == b"https" else 80),
        )
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        try:
            body = request.content
        except httpx2.RequestNotRead:
            body = await request.aread()
        for _ in range(_ATTEMPTS):
            conn = await self._connection(origin, timeouts.get("connect"))
            try:
                stream = conn.open_stream(request, end_stream=not body)
            except h2.exceptions.ProtocolError:  # e.g. the server lowered its stream limit
                conn.closing = conn.closing or httpx2.RemoteProtocolError("stream limit")
                conn.reserved -= 1
                continue
            try:
                if body:
                    await conn.send_body(stream, body)
                while stream.headers is None:
                    if stream.error is not None:
                        raise stream.error
                    if stream.ended:
                        raise httpx2.RemoteProtocolError(
                            "the provider ended the stream without a response"
                        )
                    await stream.wait(timeouts.get("read"))
            except Refused:
                conn.release(stream)
                continue
            except BaseException:
                conn.release(stream)
                raise
            status = 0
            headers = []
            for name, value in stream.headers:
                if name == b":status":
                    status = int(value)
                elif not name.startswith(b":"):
                    headers.append((name, value))
            return httpx2.Response(
                status,
                headers=headers,
                stream=_Body(stream, timeouts.get("read")),
                extensions={"http_version": b"HTTP/2"},
            )
        raise httpx2.RemoteProtocolError("the provider refused the stream on every connection")

    async def aclose(self) -> None:
        """Close every connection."""
        for pool in list(self._pools.values()):
            for conn in list(pool):
                conn.closing = conn.closing or httpx2.ConnectError("transport closed")
                if conn.sock is not None:
                    with contextlib.suppress(h2.exceptions.ProtocolError):
                        conn.h2.close_connection()
                        conn.flush()
                    conn.sock.close()
        self._pools.clear()
