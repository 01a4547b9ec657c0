"""One HTTP/2 connection to a provider, for providers/http2.py's transport.

`Connection` is the asyncio protocol of one socket: it owns the `h2` state machine and
hands each frame's content to its `Stream` as it is read (in `data_received`: no task,
no lock), sends requests within the flow-control windows, and resets a stream whose
response is given up. The transport picks connections and turns streams into responses.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx2

if TYPE_CHECKING:
    from providers.http2 import H2Transport

# Receive windows: a stream may run this far ahead of its reader, a connection this far
# ahead of all of them (the defaults of 64 KiB would stall a fast provider).
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 1 << 24
# Read data is acknowledged (its window handed back) once this much has accumulated on a
# stream, not per read: a call into h2 per token costs more than relaying the token.
ACK_EVERY = 1 << 15
# Request headers that HTTP/2 forbids (RFC 9113 8.2.2); `host` becomes `:authority`.
_NOT_SENT = frozenset(
    {b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


class Refused(Exception):
    """The server did not process the stream (GOAWAY above it, REFUSED_STREAM): resend."""


class Stream:
    """One request/response exchange on a connection."""

    __slots__ = (
        "chunks",
        "conn",
        "ended",
        "error",
        "headers",
        "id",
        "released",
        "unacked",
        "waiter",
    )

    def __init__(self, conn: Connection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.chunks: list[bytes] = []  # a list: an empty deque costs 760 bytes per stream
        self.unacked = 0  # flow-controlled bytes received and not yet handed back
        self.ended = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.released = False  # its reservation on the connection was given back

    def wake(self) -> None:
        """Wake the reader waiting on this stream, if any."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, read_timeout: float | None) -> None:
        """Wait until something arrives for this stream (httpx2's read timeout applies)."""
        self.waiter = self.conn.loop.create_future()
        try:
            if read_timeout is None:
                await self.waiter
            else:
                async with asyncio.timeout(read_timeout):
                    await self.waiter
        except TimeoutError:
            raise httpx2.ReadTimeout("the provider sent nothing within the read timeout") from None
        finally:
            self.waiter = None


class Connection(asyncio.Protocol):
    """One HTTP/2 connection: the h2 state machine, its socket and its open streams."""

    def __init__(self, transport: H2Transport, origin: tuple[bytes, bytes, int]) -> None:
        self.pool = transport
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.h2 = h2.connection.H2Connection(
            # our outbound headers are built right here (lower-case names, no
            # connection-specific ones): h2 need not check them again per request. It
            # still normalizes them, which marks Authorization never-indexed in HPACK.
            h2.config.H2Configuration(
                client_side=True, header_encoding=None, validate_outbound_headers=False
            )
        )
        self.sock: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.reserved = 0  # requests that chose this connection and have not finished
        self.closing: Exception | None = None  # why no new stream may open here
        self.opened: asyncio.Future[None] = self.loop.create_future()
        self.window: asyncio.Future[None] | None = None  # woken when a send window opens
        self.writable: asyncio.Future[None] | None = None  # set while the socket is paused
        self.idle: asyncio.TimerHandle | None = None
        self.limit = transport.max_streams  # streams open at once: ours and the server's

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the preface and our settings."""
        self.sock = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        codes = h2.settings.SettingCodes
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                codes.ENABLE_PUSH: 0,
                codes.MAX_CONCURRENT_STREAMS: 100,  # server-initiated: none are expected
                codes.INITIAL_WINDOW_SIZE: self.pool.stream_window,
                codes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        # h2 lists this setting by default; servers need not know it
        del self.h2.local_settings[codes.ENABLE_CONNECT_PROTOCOL]
        self.h2.initiate_connection()
        if self.pool.connection_window > 65535:  # the protocol's initial value
            self.h2.increment_flow_control_window(self.pool.connection_window - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        """Hand each frame's content to its stream."""
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            if not self.opened.done():  # e.g. an HTTP/1.1 server answering our preface
                self.opened.set_exception(
                    httpx2.ConnectError(
                        f"{self.origin[1].decode()} does not speak HTTP/2 ({exc}); "
                        "set http2 = false for this provider"
                    )
                )
            self.shut(httpx2.RemoteProtocolError(f"HTTP/2 protocol error from the provider: {exc}"))
            return
        streams = self.streams
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                stream = streams.get(event.stream_id)
                if stream is None:  # reset by us meanwhile: hand the window back
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    continue
                stream.chunks.append(event.data)
                stream.unacked += event.flow_controlled_length
                stream.wake()
            elif isinstance(event, h2.events.ResponseReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.headers = list(event.headers)  # type: ignore[arg-type]
                    stream.wake()
            elif isinstance(event, h2.events.StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.ended = True
                    stream.wake()
            elif isinstance(event, h2.events.StreamReset):
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    refused = event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                    stream.error = (
                        Refused()
                        if refused and stream.headers is None
                        else httpx2.RemoteProtocolError(
                            f"the provider reset the stream ({error_name(event.error_code)})"
                        )
                    )
                    stream.wake()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway(event.last_stream_id or 0, event.error_code or 0)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.limit = min(
                    self.pool.max_streams, self.h2.remote_settings.max_concurrent_streams
                )
                # the server's first SETTINGS: only now is its stream limit known
                if not self.opened.done():
                    self.opened.set_result(None)
                self.wake_senders()
            elif isinstance(event, h2.events.WindowUpdated):
                self.wake_senders()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail every open stream; the pool forgets this connection."""
        error = httpx2.ReadError(
            "the connection to the provider closed" + (f": {exc}" if exc else "")
        )
        if not self.opened.done():
            self.opened.set_exception(
                httpx2.ConnectError(
                    f"{self.origin[1].decode()} closed the connection before its HTTP/2 "
                    "preface; if it does not speak HTTP/2, set http2 = false for this provider"
                )
            )
            self.opened.exception()  # retrieved: the waiters get their own copy
        self.closing = self.closing or error
        for stream in self.streams.values():
            if stream.error is None and not stream.ended:
                stream.error = error
            stream.wake()
        self.streams.clear()
        self.wake_senders()
        if self.idle is not None:
            self.idle.cancel()
        self.pool.forget(self)

    def pause_writing(self) -> None:
        """The socket's buffer is full: request bodies wait (see send_body)."""
        self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        """The socket drained."""
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    # --- used by the transport ----------------------------------------------------------

    def flush(self) -> None:
        """Write whatever h2 has queued (frames, window updates, acknowledgements)."""
        data = self.h2.data_to_send()
        if data and self.sock is not None and not self.sock.is_closing():
            self.sock.write(data)

    def usable(self) -> bool:
        """Whether a new request may choose this connection."""
        return self.closing is None and self.reserved < self.limit

    def wake_senders(self) -> None:
        """Wake request bodies waiting for a send window."""
        if self.window is not None and not self.window.done():
            self.window.set_result(None)
        self.window = None

    def goaway(self, last_stream_id: int, code: int) -> None:
        """The server will take no new streams; those above `last_stream_id` were not processed."""
        self.closing = self.closing or httpx2.RemoteProtocolError(
            f"the provider closed the connection ({error_name(code)})"
        )
        for stream_id in [s for s in self.streams if s > last_stream_id]:
            stream = self.streams.pop(stream_id)
            stream.error = Refused()
            stream.wake()
        if not self.streams and self.sock is not None:
            self.sock.close()

    def shut(self, error: Exception) -> None:
        """Close the connection, failing its streams with `error`."""
        self.closing = error
        for stream in self.streams.values():
            stream.error = error
            stream.wake()
        self.streams.clear()
        if self.sock is not None:
            self.sock.abort()

    def open_stream(self, request: httpx2.Request, end_stream: bool) -> Stream:
        """Send the request's headers on a new stream."""
        url = request.url
        headers = [
            (b":method", request.method.encode("ascii")),
            (b":authority", request.headers.get("host", url.netloc.decode("ascii")).encode()),
            (b":scheme", url.raw_scheme),
            (b":path", url.raw_path),
        ]
        for name, value in request.headers.raw:
            name = name.lower()
            if name not in _NOT_SENT and (name != b"te" or value.lower() == b"trailers"):
                headers.append((name, value))
        stream_id = self.h2.get_next_available_stream_id()
        stream = Stream(self, stream_id)
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        self.streams[stream_id] = stream
        if end_stream:
            self.flush()  # else the headers leave with the body: one write, not two
        return stream

    async def send_body(self, stream: Stream, body: bytes) -> None:
        """Send the request body within the flow-control windows, then end the stream."""
        view = memoryview(body)
        while view:
            if stream.error is not None:
                raise stream.error
            if self.closing is not None and stream.id not in self.streams:
                raise self.closing
            size = min(
                self.h2.local_flow_control_window(stream.id), self.h2.max_outbound_frame_size
            )
            if size <= 0 or self.writable is not None:
                self.flush()  # the headers, before waiting
                if size <= 0:
                    self.window = self.window or self.loop.create_future()
                    await self.window
                else:
                    await self.writable  # type: ignore[misc]
                continue
            last = size >= len(view)
            self.h2.send_data(stream.id, bytes(view[:size]), end_stream=last)
            view = view[size:]
            self.flush()
        if not body:
            self.h2.end_stream(stream.id)
            self.flush()

    def ack(self, stream: Stream, size: int) -> None:
        """The reader took `size` flow-controlled bytes: the server may send that much more."""
        self.h2.acknowledge_received_data(size, stream.id)
        self.flush()

    def release(self, stream: Stream) -> None:
        """The exchange is over (once per stream): reset it if the response is unfinished."""
        if stream.released:
            return
        stream.released = True
        if stream.unacked:
            # the connection's window is shared: what this stream held goes back to it
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(stream.unacked, stream.id)
            stream.unacked = 0
            self.flush()
        if self.streams.pop(stream.id, None) is not None and not stream.ended:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream.id, h2.errors.ErrorCodes.CANCEL)
                self.flush()
        self.reserved -= 1
        if self.reserved == 0:
            if self.closing is not None:
                if self.sock is not None:
                    self.sock.close()
            elif self.idle is None:
                self.idle = self.loop.call_later(self.pool.keepalive_expiry, self.expire)

    def expire(self) -> None:
        """Close the connection if it stayed idle for keepalive_expiry."""
        self.idle = None
        if self.reserved == 0 and self.sock is not None:
            self.closing = self.closing or httpx2.ConnectError("idle connection closed")
            self.pool.forget(self)
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
                self.flush()
            self.sock.close()


def error_name(code: int) -> str:
    """An HTTP/2 error code by name."""
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"error {code}"
