"""OpenAI-compatible API under /v1: chat completions (streamed or not) and the model list.

Stateless by default: the request's messages are the whole prompt and nothing is stored.
With `X-Conversation-Id: <id>` (or `new`) the exchange is stored in that conversation: the
last message of the request is the new user message, the conversation's stored history is
the context (earlier user/assistant messages in the request are not sent upstream), and
the request's system message(s), if any, become the conversation's system prompt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

import orjson
from aiohttp import web

from app.auth import user_id
from app.errors import ApiError
from app.heartbeat import quiet_after
from app.keys import DISCONNECTS, PROVIDERS, SERVICE, SETTINGS, STORE
from app.openai_format import Chunks, completion, upstream_error
from app.openai_request import (
    CompletionRequest,
    bad_request,
    model_ids,
    parse_completion,
    resolve_model,
)
from app.runs import Run
from app.service import ChatService, SendRequest
from app.sse_response import PING, SSEResponse
from app.validate import MAX_SYSTEM, check_id, json_body
from app.views_api import streaming_enabled

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

CONVERSATION_HEADER = "X-Conversation-Id"
MESSAGE_HEADER = "X-Message-Id"
TRANSPORT = "openai"


def _model_object(model_id: str, owner: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner}


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """Every model of every available provider, in OpenAI's list format."""
    ids = model_ids(request.app[PROVIDERS], request.app[SERVICE].default_provider)
    return web.json_response({"object": "list", "data": [_model_object(*i) for i in ids]})


@routes.get("/v1/models/{model:.+}")
async def get_model(request: web.Request) -> web.Response:
    """One model by id (ids of other providers contain a '/')."""
    name = request.match_info["model"]
    for model_id, owner in model_ids(request.app[PROVIDERS], request.app[SERVICE].default_provider):
        if model_id == name:
            return web.json_response(_model_object(model_id, owner))
    raise ApiError(404, "model_not_found", f"The model {name!r} does not exist.", field="model")


# -- the endpoint ----------------------------------------------------------------------


def _client_gone(request: web.Request) -> tuple[asyncio.Future[None], Callable[[], object]]:
    """A future set once the client's connection is closed, and the callback watched for it
    (to hand to DISCONNECTS.discard)."""
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_gone() -> None:
        if not gone.done():
            gone.set_result(None)

    request.app[DISCONNECTS].add(request, on_gone)
    return gone, on_gone


async def _leave(service: ChatService, run: Run) -> None:
    """The client is done with the run: cancel it if stateless, else as on_disconnect says."""
    service.subscriber_left(run, TRANSPORT)
    if not run.persist and not run.done:
        await service.cancel(run)


async def _start_stored(
    request: web.Request, header: str, req: CompletionRequest, provider: str, model: str
) -> Run:
    """Start a run stored in the conversation named by X-Conversation-Id (or a new one)."""
    store, service, uid = request.app[STORE], request.app[SERVICE], user_id(request)
    system = "\n\n".join(m.content for m in req.messages if m.role == "system")
    turns = [m for m in req.messages if m.role != "system"]
    if not turns or turns[-1].role != "user" or not turns[-1].content.strip():
        raise bad_request(
            f"With {CONVERSATION_HEADER} the last message must be the new user message.",
            "messages",
        )
    if len(system) > MAX_SYSTEM:
        raise bad_request(f"The system message is longer than {MAX_SYSTEM} characters.", "messages")
    send = SendRequest(
        content=turns[-1].content, provider=provider, model=model, options=req.options
    )
    if header.strip().lower() == "new":
        if len(turns) > 1:
            raise bad_request(
                f"{CONVERSATION_HEADER}: new starts a conversation from one user message (and"
                " optional system messages); continue it by sending its id.",
                "messages",
            )
        async with service.limiter.new_conversation(uid):  # 403 at the user's cap
            created = await store.create_conversation(
                uid, provider=provider, model=model, system_prompt=system
            )
        try:
            run, _ = await service.start(uid, created, send)
        except BaseException:
            await store.delete_conversation(uid, created["id"])
            raise
        return run
    conv = await store.get_conversation(uid, check_id(header.strip()))
    if conv is None:
        raise ApiError(404, "conversation_not_found", "No such conversation.")
    changed = bool(system) and system != conv["system_prompt"]
    run, _ = await service.start(uid, {**conv, "system_prompt": system} if changed else conv, send)
    if changed:
        await store.update_conversation(uid, conv["id"], {"system_prompt": system})
    return run


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI's chat.completions: stateless, or stored with X-Conversation-Id."""
    req = parse_completion(await json_body(request))
    if req.stream:
        streaming_enabled(request)
    service = request.app[SERVICE]
    provider, model = resolve_model(request.app[PROVIDERS], service.default_provider, req.model)
    header = request.headers.get(CONVERSATION_HEADER)
    headers: dict[str, str] = {}
    if header is None:
        run = service.start_ephemeral(user_id(request), req.messages, provider, model, req.options)
    else:
        run = await _start_stored(request, header, req, provider, model)
        headers = {CONVERSATION_HEADER: run.conversation_id, MESSAGE_HEADER: run.message_id}
    run.subscribe(TRANSPORT)
    created = int(time.time())
    try:
        if req.stream:
            return await _ChunkStream(request, run, created, req.include_usage, headers).serve()
        return await _complete(request, run, created, headers)
    finally:
        await _leave(service, run)


def _decode(batch: list[tuple[int, str]]) -> list[dict[str, Any]]:
    return [orjson.loads(data) for _, data in batch]


async def _complete(
    request: web.Request, run: Run, created: int, headers: dict[str, str]
) -> web.StreamResponse:
    gone, watching = _client_gone(request)
    finished = asyncio.create_task(run.wait_finished())
    try:
        await asyncio.wait({gone, finished}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        request.app[DISCONNECTS].discard(watching)
        gone.cancel()
        finished.cancel()
    if not run.done:
        return web.Response(status=204)  # nobody is listening any more
    end = orjson.loads(run.last_event())
    if end["type"] == "error":
        raise upstream_error(end, headers)
    body = completion(
        f"chatcmpl-{run.message_id}",
        created,
        f"{run.provider}/{run.model}",
        run.text(),
        run.reasoning_text(),
        end,
    )
    return web.json_response(body, headers=headers)


class _ChunkStream:
    """One /v1 streaming response: the run's events as chat.completion.chunk frames.

    Headers are held until the first text (or the end), at most about streaming.heartbeat
    seconds, so a failure before any text (rate limit, unknown model upstream) is an
    ordinary HTTP error the client's SDK raises as its own exception class. Then a quiet
    stream gets a `: ping` comment about every heartbeat, which SSE readers (the openai
    SDK's among them) skip.
    """

    def __init__(
        self,
        request: web.Request,
        run: Run,
        created: int,
        include_usage: bool,
        headers: dict[str, str],
    ) -> None:
        self.request, self.run, self.headers = request, run, headers
        self.created, self.include_usage = created, include_usage
        self.loop = asyncio.get_running_loop()
        # the heartbeat wakes a subscriber after this much quiet (app/heartbeat.py)
        self.quiet = quiet_after(request.app[SETTINGS].streaming.heartbeat)
        self.written_at = self.loop.time()  # (the hold starts now)
        self.resp: SSEResponse | None = None
        self.chunks: Chunks | None = None

    async def open(self) -> SSEResponse:
        """Send the headers and the first chunk (the assistant's role)."""
        out = SSEResponse(headers=self.headers, allow_all_methods=True, sep="\n")
        await out.prepare(self.request)
        self.resp = out
        # named when the first text comes, which may be after a fallback to another model
        run = self.run
        model = f"{run.provider}/{run.model}"
        self.chunks = Chunks(f"chatcmpl-{run.message_id}", self.created, model, self.include_usage)
        await out.send(self.chunks.chunk({"role": "assistant", "content": ""}))
        self.written_at = self.loop.time()
        return out

    async def send(self, batch: list[tuple[int, str]]) -> None:
        """Relay one batch of the run's events (status and start events have no chunk)."""
        decoded = [e for e in _decode(batch) if e["type"] not in ("start", "status")]
        resp = self.resp
        if not decoded:
            # the heartbeat's empty batch, or only events /v1 has no chunk for
            if self.loop.time() - self.written_at >= self.quiet:
                if resp is None:
                    await self.open()  # held long enough: show the answer has begun
                else:
                    await resp.write(PING)
                    self.written_at = self.loop.time()
            return
        if resp is None:
            if decoded[0]["type"] == "error":
                raise upstream_error(decoded[0], self.headers)
            resp = await self.open()
        assert self.chunks is not None
        for frame in self.chunks.frames(decoded):
            await resp.send(frame)
        self.written_at = self.loop.time()

    async def serve(self) -> web.StreamResponse:
        """Relay until the run ends ([DONE]) or the client goes away.

        A client that leaves is noticed by DisconnectWatch, which cancels this handler,
        as it does the native SSE stream's: one `async for` per stream, no task per batch.
        """
        watch = self.request.app[DISCONNECTS]
        task = asyncio.current_task()
        assert task is not None
        watching = task.cancel
        watch.add(self.request, watching)
        events = self.run.follow(0)
        try:
            async for batch in events:
                await self.send(batch)
            resp = self.resp or await self.open()  # (an end without a terminal event)
            await resp.send("[DONE]")
            return resp
        except (ConnectionResetError, TimeoutError):
            log.debug("openai stream client went away (message %s)", self.run.message_id)
            return self.resp or web.Response(status=204)
        finally:
            watch.discard(watching)
            if self.resp is not None:
                self.resp.stop_streaming()
            await cast(AsyncGenerator[Any, None], events).aclose()
