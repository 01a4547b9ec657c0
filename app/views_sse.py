"""SSE transport: `id: <seq>` + one `data: <json>` line per event, resumable."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

from aiohttp import web

from app.auth import user_id
from app.errors import ApiError, not_found
from app.events import replay_finished
from app.keys import DISCONNECTS, METRICS, SERVICE, SETTINGS, STORE
from app.runs import Run
from app.settings import StreamingSettings
from app.sse_response import PING, SSEResponse
from app.validate import check_id, json_body, parse_regenerate, parse_send
from app.views_api import load_conversation, streaming_enabled

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
# Below every transport's pause threshold (asyncio 64 KiB, uvloop 16 KiB high-water mark)
UNTIMED_WRITE = 8192


def _after(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    try:
        after = int(raw)
    except ValueError:
        raise ApiError(
            400, "bad_request", "Last-Event-ID / after must be an integer.", field="after"
        ) from None
    if after < 0:
        raise ApiError(
            400, "bad_request", "Last-Event-ID / after must not be negative.", field="after"
        )
    return after


async def _open(request: web.Request, settings: StreamingSettings) -> SSEResponse:
    """Send the SSE headers. A client that left while its run was starting: the run goes
    on (resumable) and the response ends as aiohttp-sse ends one whose client is gone,
    not as a server error."""
    resp = SSEResponse(
        allow_all_methods=True,
        sep="\n",
        # sets TCP_USER_TIMEOUT: unacknowledged data this long and the kernel drops the peer
        send_timeout=settings.send_timeout,
    )
    if request.transport is None or request.transport.is_closing():
        raise asyncio.CancelledError
    try:
        await resp.prepare(request)
    except ConnectionResetError:
        raise asyncio.CancelledError from None
    return resp


async def _respond(
    request: web.Request, run: Run | None, batches: AsyncGenerator[list[tuple[int, str]], None]
) -> SSEResponse:
    """Write `batches` as SSE; with `run`, count this client as one of its subscribers.

    Everything happens in this one frame (no wrapper generator per stream): it is held
    for as long as the stream is open, times every open stream.
    """
    settings = request.app[SETTINGS].streaming
    resp = await _open(request, settings)
    if run is not None:
        run.subscribe("sse")
    # A client that leaves while nothing is written (a slow first token, a quiet run)
    # ends this handler within DisconnectWatch.poll, not at the next write: it stops
    # counting as a subscriber, and with on_disconnect = "cancel" the run stops.
    watch = request.app[DISCONNECTS]
    task = asyncio.current_task()
    assert task is not None
    watching = task.cancel
    watch.add(request, watching)
    try:
        # each batch is handed straight to _send: nothing of it (nor its encoded frames)
        # stays referenced from this frame while the stream waits, times every open stream
        while await _send(request, resp, settings, await anext(batches, None)):
            pass
    except (ConnectionResetError, TimeoutError):
        pass  # the client went away (or stalled and was cut); the run goes on without it
    finally:
        watch.discard(watching)
        await batches.aclose()
        if run is not None:
            request.app[SERVICE].subscriber_left(run, "sse")
        resp.stop_streaming()
    return resp


async def _send(
    request: web.Request,
    resp: SSEResponse,
    settings: StreamingSettings,
    batch: list[tuple[int, str]] | None,
) -> bool:
    """Write one batch; False once there is nothing more to write (None: the end)."""
    if batch is None:
        return False
    if len(batch) > settings.subscriber_lag_limit:
        # too far behind: drop it; it can resume from its Last-Event-ID
        log.info("dropping SSE client %d events behind", len(batch))
        if request.transport is not None:
            request.transport.abort()
        return False
    # One write per batch: the same bytes resp.send() frames event by event (our JSON
    # has no raw line breaks), without its per-event regex, buffer and timer. An empty
    # batch is the heartbeat: the stream was quiet (app/heartbeat.py).
    frames = (
        "".join([f"id: {seq}\ndata: {data}\n\n" for seq, data in batch]).encode() if batch else PING
    )
    transport = request.transport
    if (
        transport is not None
        and len(frames) < UNTIMED_WRITE
        and not transport.get_write_buffer_size()
    ):
        # Nothing queued and a small write: the transport takes it without waiting, so
        # no send timer (one per token otherwise); a stalled client's buffer fills and
        # its next write is timed.
        await resp.write(frames)
        return True
    try:
        async with asyncio.timeout(settings.send_timeout):
            await resp.write(frames)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()  # as aiohttp-sse does for a stalled send
        raise
    return True


async def _replay(
    events: list[tuple[int, str]], after: int
) -> AsyncGenerator[list[tuple[int, str]], None]:
    batch = [(s, d) for s, d in events if s > after]
    if batch:
        yield batch


@routes.post("/api/v1/conversations/{cid}/stream")
async def send_stream(request: web.Request) -> web.StreamResponse:
    """Send a message and stream the run's events as SSE."""
    streaming_enabled(request)
    cid = check_id(request.match_info["cid"])
    req = parse_send(await json_body(request))
    service = request.app[SERVICE]
    run, _ = await service.start(user_id(request), cid, req)  # 404 unless the user's
    return await _respond(request, run, run.follow(0))


@routes.post("/api/v1/conversations/{cid}/regenerate")
async def regenerate_stream(request: web.Request) -> web.StreamResponse:
    """Replace the last answer with a new one, streamed as SSE."""
    streaming_enabled(request)
    cid = check_id(request.match_info["cid"])
    body = await json_body(request) if request.can_read_body else {}
    req = parse_regenerate(body)
    service = request.app[SERVICE]
    run, _ = await service.start(user_id(request), cid, req)  # 404 unless the user's
    return await _respond(request, run, run.follow(0))


@routes.post("/api/v1/conversations/{cid}/messages/{mid}/continue")
async def continue_stream(request: web.Request) -> web.StreamResponse:
    """Continue an interrupted, stopped or failed answer; streams only the new text."""
    streaming_enabled(request)
    conv = await load_conversation(request)
    mid = check_id(request.match_info["mid"], "message")
    body = await json_body(request) if request.can_read_body else {}
    req = parse_regenerate(body)
    service = request.app[SERVICE]
    run = await service.continue_answer(user_id(request), conv, mid, req)
    return await _respond(request, run, run.follow(0))


@routes.get("/api/v1/conversations/{cid}/messages/{mid}/stream")
async def resume_stream(request: web.Request) -> web.StreamResponse:
    """Replay events after Last-Event-ID (or ?after=), then follow the live run to its end."""
    streaming_enabled(request)
    conv = await load_conversation(request)
    mid = check_id(request.match_info["mid"], "message")
    after = _after(request)
    request.app[METRICS].resumes.labels("sse").inc()
    service = request.app[SERVICE]
    run = service.get_run(mid)
    if run is not None and run.conversation_id == conv["id"]:
        return await _respond(request, run, run.follow(after))
    message = await request.app[STORE].get_message(user_id(request), conv["id"], mid)
    if message is None or message["role"] != "assistant":
        raise not_found("message")
    # The exact event log is gone: replay the saved state in full; the start event's
    # "replay": true tells the client to replace what it has rather than append.
    return await _respond(request, None, _replay(replay_finished(message, conv["id"]), 0))
