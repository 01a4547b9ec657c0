"""What every fake upstream shares: a queue of plans, pacing, awkward splits, failures, records.

A fake is a real aiohttp app on loopback (run it with pytest-aiohttp's `aiohttp_server`,
whose server cancels a handler when its client disconnects, which is how the fake records
disconnects). Each request takes the next queued Plan; with none queued it streams a
default answer. Subclasses only render their provider's wire format.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

FOREVER = 3600.0


@dataclass
class Plan:
    """What the fake does with one request."""

    text: tuple[str, ...] = ("Hello", ", ", "world", "!")
    reasoning: tuple[str, ...] = ()
    usage: tuple[int, int] = (11, 4)
    finish: str = "stop"  # stop | length | filtered (the provider's policy stop)
    delay: float = 0.0  # pause before each text frame
    chunk: int | None = None  # write the body in pieces of this many bytes...
    split_utf8: bool = False  # ...and cut inside every multi-byte character
    split_pause: float = 0.0  # pause between pieces, so they arrive as separate reads
    status: int = 200  # not 200: answer an error instead of a stream
    error: str = ""  # what kind of error: auth | not_found | rate_limit | quota | server
    #                  | overloaded | bad_key | filtered | context (each fake renders it)
    retry_after: str | None = None  # Retry-After header (and Gemini's RetryInfo)
    hang: bool = False  # send headers, then nothing (first-token timeout)
    hang_before_headers: bool = False  # accept the request, answer nothing at all
    stall_after: int | None = None  # after this many text frames send nothing more
    reset_after: int | None = None  # after this many text frames reset the connection
    stream_error_after: int | None = None  # after this many text frames, an in-stream error
    prompt_blocked: bool = False  # Gemini: promptFeedback.blockReason and no candidates
    extra_frames: tuple[str, ...] = ()  # frames a fake may interleave (ping, unknown types)


@dataclass
class Record:
    """One request as the fake saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    started: float
    plan: Plan
    frames_sent: int = 0
    finished: float | None = None
    disconnected: float | None = None  # when the client went away mid-answer
    reset: bool = False
    peer: Any = None  # the client's (host, port): which connection carried the request


@dataclass
class FakeUpstream:
    """Shared machinery; subclasses add routes, frames and error bodies."""

    key: str = "test-key"  # the API key the fake accepts
    models: tuple[str, ...] = ()  # models it knows (others get 404); empty: any
    plans: deque[Plan] = field(default_factory=deque)
    records: list[Record] = field(default_factory=list)

    def enqueue(self, *plans: Plan) -> None:
        """Queue plans for the next requests, in order."""
        self.plans.extend(plans)

    def app(self) -> web.Application:
        """The aiohttp app to serve."""
        app = web.Application()
        self.add_routes(app)
        return app

    # -- hooks for subclasses ------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """Register the provider's endpoints (all handled by `handle`)."""
        raise NotImplementedError

    def presented_key(self, request: web.Request) -> str:
        """The API key the client sent."""
        raise NotImplementedError

    def model(self, request: web.Request, body: Any) -> str:
        """The model the client asked for."""
        raise NotImplementedError

    def error_response(self, plan: Plan, model: str, status: int) -> web.Response:
        """The provider's error body for plan.error at `status`."""
        raise NotImplementedError

    def frames(self, plan: Plan, model: str, body: Any) -> list[tuple[str, bytes]]:
        """The stream as (kind, bytes) frames; kind "text" frames count for stall/reset."""
        raise NotImplementedError

    # -- the handler -----------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one request according to the next plan."""
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        plan = self.plans.popleft() if self.plans else Plan()
        rec = Record(
            request.method,
            request.path,
            dict(request.query),
            dict(request.headers),
            body,
            time.monotonic(),
            plan,
        )
        rec.peer = request.transport.get_extra_info("peername") if request.transport else None
        self.records.append(rec)
        model = self.model(request, body)
        try:
            if self.presented_key(request) != self.key:
                return self.error_response(Plan(error="auth"), model, 401)
            if self.models and model not in self.models:
                return self.error_response(Plan(error="not_found"), model, 404)
            if plan.status != 200:
                return self.error_response(plan, model, plan.status)
            if plan.hang_before_headers:
                await asyncio.sleep(FOREVER)
            return await self._stream(request, rec, plan, model, body)
        except (asyncio.CancelledError, ConnectionResetError):
            # handler cancellation (client gone) or a failed write
            rec.disconnected = time.monotonic()
            raise
        finally:
            rec.finished = time.monotonic()

    async def _stream(
        self, request: web.Request, rec: Record, plan: Plan, model: str, body: Any
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if plan.hang:
            await asyncio.sleep(FOREVER)
        texts = 0
        for kind, data in self.frames(plan, model, body):
            if kind == "text":
                if plan.stall_after is not None and texts >= plan.stall_after:
                    await asyncio.sleep(FOREVER)
                if plan.reset_after is not None and texts >= plan.reset_after:
                    rec.reset = True
                    reset_connection(request)
                    return resp
                if plan.delay:
                    await asyncio.sleep(plan.delay)
                texts += 1
            await self._write(resp, data, plan)
            rec.frames_sent += 1
        await resp.write_eof()
        return resp

    async def _write(self, resp: web.StreamResponse, data: bytes, plan: Plan) -> None:
        for piece in split(data, plan.chunk, plan.split_utf8):
            await resp.write(piece)
            if plan.split_pause:
                await asyncio.sleep(plan.split_pause)


def split(data: bytes, size: int | None, utf8: bool) -> list[bytes]:
    """Cut bytes every `size` bytes and (with utf8) inside every multi-byte character."""
    cuts: set[int] = set()
    if size:
        cuts.update(range(size, len(data), size))
    if utf8:
        for i, b in enumerate(data):
            # a lead byte of a multi-byte sequence: cut right after it
            if b >= 0xC0:
                cuts.add(i + 1)
    points = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def reset_connection(request: web.Request) -> None:
    """Drop the TCP connection with an RST (SO_LINGER 0), as a crashed proxy would."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def sse(data: Any, event: str | None = None, newline: str = "\n") -> bytes:
    """One SSE frame: optional `event:` line, one `data:` line, blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}{newline}" if event else ""
    return f"{head}data: {payload}{newline}{newline}".encode()


async def wait_for(predicate: Any, within: float = 3.0) -> float:
    """Poll until predicate() is true; return when (monotonic). Fails after `within` s."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)
    return time.monotonic()
