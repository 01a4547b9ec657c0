"""The fake upstream's HTTP/2 side: the same chat.completions streams over h2c.

Served next to bench.upstream's HTTP/1.1 port (`--h2-port`), sharing its Stats, so the
harness reads one set of figures whichever side a relay used. Written on the `h2` state
machine with one protocol object per connection (no framework): at 10,000 streams of
1 token/s it shares a core with the load generator. A stream the client resets
(RST_STREAM, how an HTTP/2 client cancels) is recorded as a disconnect the moment the
frame is read.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import orjson

from bench.spec import StreamSpec, parse
from bench.upstream import Stats, writes

WINDOW = 1 << 24  # our receive window: request bodies are small, never a limit


class H2Upstream(asyncio.Protocol):
    """One client connection."""

    def __init__(self, stats: Stats, batch: int) -> None:
        self.stats = stats
        self.batch = batch
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.sock: asyncio.Transport | None = None
        self.requests: dict[int, tuple[bytes, bytearray]] = {}  # stream -> (path, body)
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.specs: dict[int, str] = {}  # stream -> the stream spec's id
        self.window: asyncio.Future[None] | None = None
        self.writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send our settings."""
        self.sock = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000},
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        """Collect requests; start a response when one is complete."""
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            assert self.sock is not None
            self.sock.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers).get(b":path", b"")  # type: ignore[arg-type]
                self.requests[event.stream_id] = (path, bytearray())  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                req = self.requests.get(event.stream_id)
                if req is not None:
                    req[1].extend(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                req = self.requests.pop(event.stream_id, None)
                if req is not None:
                    task = asyncio.get_running_loop().create_task(
                        self.respond(event.stream_id, *req)
                    )
                    self.tasks[event.stream_id] = task
            elif isinstance(event, h2.events.StreamReset):
                self.cancel(event.stream_id)
            elif (
                isinstance(event, h2.events.WindowUpdated)
                and self.window is not None
                and not self.window.done()
            ):
                self.window.set_result(None)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        """Every open stream was disconnected."""
        for stream_id in list(self.tasks):
            self.cancel(stream_id)
        if self.window is not None and not self.window.done():
            self.window.set_result(None)

    def pause_writing(self) -> None:
        """The socket's buffer is full."""
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        """The socket drained."""
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def cancel(self, stream_id: int) -> None:
        """The client went away from this stream: record it, stop its response."""
        task = self.tasks.pop(stream_id, None)
        if task is not None and not task.done():
            spec_id = self.specs.pop(stream_id, None)
            if spec_id is not None:
                self.stats.disconnects[spec_id] = time.monotonic()
            task.cancel()

    def flush(self) -> None:
        """Write what h2 has queued."""
        data = self.h2.data_to_send()
        if data and self.sock is not None and not self.sock.is_closing():
            self.sock.write(data)

    async def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        """Send `data` within the client's windows (and the socket's back-pressure)."""
        while data:
            size = min(
                self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size
            )
            if size <= 0:
                self.window = self.window or asyncio.get_running_loop().create_future()
                await self.window
                self.window = None
                continue
            self.h2.send_data(stream_id, data[:size])
            data = data[size:]
        if end:
            self.h2.end_stream(stream_id)
        self.flush()
        if self.writable is not None:
            await self.writable

    async def respond(self, stream_id: int, path: bytes, body: bytearray) -> None:
        """Answer one request: a paced or unpaced chat.completions stream."""
        stats = self.stats
        try:
            if not path.endswith(b"/chat/completions"):
                self.h2.send_headers(stream_id, [(b":status", b"404")], end_stream=True)
                self.flush()
                return
            req = orjson.loads(body)
            messages = req.get("messages") or []
            prompt = next(
                (m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), ""
            )
            spec = parse(prompt if isinstance(prompt, str) else "") or StreamSpec("none", 8)
            self.specs[stream_id] = spec.id
            stats.requests += 1
            stats.h2_requests += 1
            stats.active += 1
            stats.received[spec.id] = time.monotonic()
            try:
                await self.stream(stream_id, spec, str(req.get("model", "")))
                stats.completed += 1
            finally:
                stats.active -= 1
        except h2.exceptions.ProtocolError:
            pass  # the stream or connection closed under us; recorded by cancel()
        finally:
            self.tasks.pop(stream_id, None)
            self.specs.pop(stream_id, None)

    async def stream(self, stream_id: int, spec: StreamSpec, model: str) -> None:
        """The response itself, written as bench.upstream writes it over HTTP/1.1."""
        self.h2.send_headers(
            stream_id, [(b":status", b"200"), (b"content-type", b"text/event-stream")]
        )
        async for data in writes(spec, model, self.batch, self.stats):
            await self.send(stream_id, data)
        await self.send(stream_id, b"", end=True)
