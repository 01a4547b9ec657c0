"""WebSocket transport: many runs per socket; send, cancel, resume, ping ops."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from app.auth import check_ws_origin, still_authorized, user_id
from app.errors import ApiError
from app.events import encode, replay_finished
from app.keys import METRICS, SERVICE, SETTINGS, SOCKETS, STORE
from app.runs import Run
from app.validate import ID_RE, parse_regenerate, parse_send

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


class Socket:
    """One client socket: its forwarding tasks, one per followed run."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self.request = request
        self.ws = ws
        self.app = request.app
        self.user = user_id(request)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        settings = request.app[SETTINGS].streaming
        self.send_timeout = settings.send_timeout
        self.lag_limit = settings.subscriber_lag_limit
        request.app[SOCKETS].add(self)

    async def flush(self, limit: float) -> None:
        """Wait (at most `limit` s) until every followed run has been forwarded to its end."""
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=limit)

    def abort(self, reason: str) -> None:
        """Drop a client that cannot keep up; it may reconnect and resume from its last seq."""
        log.info("dropping websocket client: %s", reason)
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def error(self, code: str, message: str, **extra: Any) -> None:
        """Send an error event that is about a client message, not a run."""
        if not self.ws.closed:
            await self.ws.send_str(
                encode(
                    {"type": "error", "code": code, "message": message, "retryable": False, **extra}
                )
            )

    def follow(self, run: Run, after: int) -> None:
        """Forward a run's events after `after` to this socket (replacing an older follower)."""
        old = self.tasks.pop(run.message_id, None)
        if old is not None:
            old.cancel()
        self.tasks[run.message_id] = asyncio.create_task(self._forward(run, after))

    async def _forward(self, run: Run, after: int) -> None:
        service = self.app[SERVICE]
        run.subscribe("ws")
        try:
            async for batch in run.follow(after):
                if len(batch) > self.lag_limit:
                    self.abort(f"{len(batch)} events behind run {run.message_id}")
                    return
                for _, data in batch:
                    async with asyncio.timeout(self.send_timeout):
                        await self.ws.send_str(data)
        except TimeoutError:
            self.abort(f"a write blocked for more than {self.send_timeout:g} s")
        except (ConnectionResetError, RuntimeError):
            pass  # socket closed under us
        finally:
            service.subscriber_left(run, "ws")
            if self.tasks.get(run.message_id) is asyncio.current_task():
                del self.tasks[run.message_id]

    async def handle(self, raw: str) -> None:
        """Dispatch one client message; bad ones get a bad_request error event."""
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self.error("bad_request", "The message is not valid JSON.")
            return
        if not isinstance(msg, dict):
            await self.error("bad_request", "The message must be a JSON object.")
            return
        op = msg.get("op")
        if op != "ping" and not await still_authorized(self.request):
            await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"API key revoked")
            return
        request_id = msg.get("request_id")
        echo = {"request_id": request_id} if isinstance(request_id, str) else {}
        try:
            if op == "ping":
                await self.ws.send_str('{"type":"pong"}')
            elif op == "send":
                await self.op_send(msg)
            elif op == "cancel":
                await self.op_cancel(msg)
            elif op == "resume":
                await self.op_resume(msg)
            elif op == "regenerate":
                await self.op_regenerate(msg)
            elif op == "continue":
                await self.op_continue(msg)
            else:
                await self.error("bad_request", f"Unknown op {op!r}.", **echo)
        except ApiError as exc:
            await self.error(exc.code, exc.message, status=exc.status, **exc.extra, **echo)
        except sqlite3.OperationalError as exc:
            log.error("database error on websocket op %r: %s", op, exc)
            await self.error("storage_busy", "The database is busy; try again shortly.", **echo)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("websocket op %r failed", op)
            await self.error("internal", "Internal server error.", **echo)

    def _conversation_id(self, cid: Any) -> str:
        if not isinstance(cid, str) or not ID_RE.match(cid):
            raise ApiError(404, "not_found", "No such conversation.")
        return cid

    async def _conversation(self, cid: Any) -> dict[str, Any]:
        conv = await self.app[STORE].get_conversation(self.user, self._conversation_id(cid))
        if conv is None:
            raise ApiError(404, "not_found", "No such conversation.")
        return conv

    def _message_id(self, msg: dict[str, Any]) -> str:
        mid = msg.get("message_id")
        if not isinstance(mid, str) or not ID_RE.match(mid):
            raise ApiError(404, "not_found", "No such message.")
        return mid

    async def op_send(self, msg: dict[str, Any]) -> None:
        """Start a run (or attach to the one a retried client_message_id started)."""
        fields = {k: v for k, v in msg.items() if k not in ("op", "conversation_id")}
        req = parse_send(fields, extra_fields={"request_id"})
        cid = self._conversation_id(msg.get("conversation_id"))
        run, _ = await self.app[SERVICE].start(self.user, cid, req)  # 404 unless the user's
        self.follow(run, 0)

    async def op_regenerate(self, msg: dict[str, Any]) -> None:
        """Replace the conversation's last answer with a new run."""
        fields = {k: v for k, v in msg.items() if k not in ("op", "conversation_id")}
        req = parse_regenerate(fields)
        cid = self._conversation_id(msg.get("conversation_id"))
        run, _ = await self.app[SERVICE].start(self.user, cid, req)  # 404 unless the user's
        self.follow(run, 0)

    async def op_continue(self, msg: dict[str, Any]) -> None:
        """Continue an interrupted, stopped or failed answer in place."""
        mid = self._message_id(msg)
        fields = {k: v for k, v in msg.items() if k not in ("op", "message_id", "conversation_id")}
        req = parse_regenerate(fields)
        message = await self.app[STORE].get_user_message(self.user, mid)
        if message is None:
            raise ApiError(404, "not_found", "No such message.")
        conv = await self._conversation(message["conversation_id"])
        run = await self.app[SERVICE].continue_answer(self.user, conv, mid, req)
        self.follow(run, 0)

    async def _owned_run(self, mid: str) -> Run | None:
        run = self.app[SERVICE].get_run(mid)
        if run is not None and run.user_id == self.user:
            return run
        return None

    async def op_cancel(self, msg: dict[str, Any]) -> None:
        """Cancel a live run; its subscribers (this socket included) get the end event."""
        mid = self._message_id(msg)
        run = await self._owned_run(mid)
        if run is None:
            raise ApiError(404, "not_found", "No live answer with that id.")
        await self.app[SERVICE].cancel(run)

    async def op_resume(self, msg: dict[str, Any]) -> None:
        """Follow a run from `after`, or replay a finished message."""
        mid = self._message_id(msg)
        after = msg.get("after", 0)
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ApiError(
                400, "bad_request", "'after' must be a non-negative integer.", field="after"
            )
        self.app[METRICS].resumes.labels("ws").inc()
        run = await self._owned_run(mid)
        if run is not None:
            self.follow(run, after)
            return
        message = await self.app[STORE].get_user_message(self.user, mid)
        if message is None or message["role"] != "assistant":
            raise ApiError(404, "not_found", "No such message.")
        for _, data in replay_finished(message, message["conversation_id"]):
            await self.ws.send_str(data)

    async def close(self) -> None:
        """Stop forwarding; runs themselves go on."""
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


@routes.get("/ws")
async def websocket(request: web.Request) -> web.StreamResponse:
    """The WebSocket endpoint."""
    if not request.app[SETTINGS].streaming.enabled:
        raise ApiError(503, "streaming_disabled", "Streaming is turned off on this server.")
    check_ws_origin(request)  # 403 before the upgrade: a cross-site page must not connect
    # aiohttp closes with 1009 (message too big) on a larger message
    max_size = request.app[SETTINGS].limits.ws_max_message_bytes
    # A ping frame after `streaming.heartbeat` without a frame from the client, the same
    # interval as SSE's `: ping`; no pong within half of it closes the socket (1006):
    # its runs go on, and a resume picks them up.
    heartbeat = request.app[SETTINGS].streaming.heartbeat
    ws = web.WebSocketResponse(heartbeat=heartbeat, max_msg_size=max_size)
    await ws.prepare(request)
    sock = Socket(request, ws)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await sock.handle(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sock.error("bad_request", "Send JSON text frames.")
            elif msg.type == WSMsgType.ERROR:
                log.info("websocket closed with error: %s", ws.exception())
    finally:
        await sock.close()
    return ws
