"""JSON endpoints under /api/v1: conversations, messages, cancel, providers, health."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from app.auth import user_id
from app.errors import ApiError, not_found
from app.keys import PROVIDERS, SERVICE, STORE
from app.validate import check_id, json_body, parse_conversation, parse_page, parse_send

routes = web.RouteTableDef()


def public_message(m: dict[str, Any]) -> dict[str, Any]:
    """A message as the API shows it."""
    out = {k: m[k] for k in ("id", "role", "content", "status", "created_at", "updated_at")}
    if m["role"] == "assistant":
        out.update(
            reasoning=m["reasoning"],
            provider=m["provider"],
            model=m["model"],
            finish_reason=m["finish_reason"],
            usage={
                "prompt_tokens": m["prompt_tokens"],
                "completion_tokens": m["completion_tokens"],
            },
            error={"code": m["error_code"], "message": m["error_message"]}
            if m["error_code"]
            else None,
            metrics={
                "ttft_ms": m["ttft_ms"],
                "tokens_per_s": m["tokens_per_s"],
                "duration_ms": m["duration_ms"],
            },
        )
    return out


async def load_conversation(request: web.Request) -> dict[str, Any]:
    """The conversation named in the URL, if it is the user's; else 404."""
    cid = check_id(request.match_info["cid"])
    conv = await request.app[STORE].get_conversation(user_id(request), cid)
    if conv is None:
        raise not_found()
    return conv


@routes.get("/api/v1/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers and the database is reachable; live runs and tasks."""
    await request.app[STORE].count_conversations("-")
    return web.json_response(
        {
            "status": "ok",
            "live_runs": len(request.app[SERVICE].live_by_conversation),
            "tasks": len(asyncio.all_tasks()),
        }
    )


@routes.get("/api/v1/providers")
async def providers(request: web.Request) -> web.Response:
    """Every configured provider, available or not (with why), and the default."""
    service = request.app[SERVICE]
    out = []
    for p in request.app[PROVIDERS].values():
        info = p.info
        out.append(
            {
                "name": info.name,
                "kind": info.kind,
                "models": list(info.models),
                "default_model": info.default_model,
                "available": info.available,
                "reason": info.reason,
            }
        )
    return web.json_response({"providers": out, "default": service.default_provider})


@routes.post("/api/v1/conversations")
async def create_conversation(request: web.Request) -> web.Response:
    """Create a conversation."""
    fields = parse_conversation(await json_body(request), partial=False)
    service = request.app[SERVICE]
    if "provider" in fields:
        fields["provider"], model = service.resolve(fields["provider"], fields.get("model"))
        fields["model"] = model
    async with service.limiter.new_conversation(user_id(request)):  # 403 at the cap
        conv = await request.app[STORE].create_conversation(user_id(request), **fields)
    return web.json_response(conv, status=201)


@routes.get("/api/v1/conversations")
async def list_conversations(request: web.Request) -> web.Response:
    """The user's conversations, newest first, paginated with limit/offset."""
    limit, offset = parse_page(request)
    store = request.app[STORE]
    uid = user_id(request)
    items = await store.list_conversations(uid, limit=limit + 1, offset=offset)
    more = len(items) > limit
    return web.json_response(
        {
            "conversations": items[:limit],
            "next_offset": offset + limit if more else None,
        }
    )


@routes.get("/api/v1/conversations/{cid}")
async def get_conversation(request: web.Request) -> web.Response:
    """A conversation with its messages and its live run, if any."""
    conv = await load_conversation(request)
    service = request.app[SERVICE]
    store = request.app[STORE]
    messages = await store.list_messages(conv["id"])
    live = service.live_run(conv["id"])
    for m in messages:
        run = service.get_run(m["id"]) if m["status"] == "streaming" else None
        if run is not None and run.finished_at is not None:
            # it finished while we read: its final state is saved by now, read it again
            messages = await store.list_messages(conv["id"])
            live = service.live_run(conv["id"])
            break
    out = []
    for m in messages:
        pm = public_message(m)
        if live is not None and m["id"] == live.message_id:
            # the live text is newer than the last flush
            pm["content"] = live.text()
            pm["reasoning"] = live.reasoning_text()
            pm["seq"] = live.last_seq
        out.append(pm)
    return web.json_response(
        {
            **conv,
            "messages": out,
            "live_message_id": live.message_id if live is not None else None,
        }
    )


@routes.patch("/api/v1/conversations/{cid}")
async def patch_conversation(request: web.Request) -> web.Response:
    """Rename, or change provider, model or system prompt."""
    conv = await load_conversation(request)
    fields = parse_conversation(await json_body(request), partial=True)
    if "provider" in fields or "model" in fields:
        fields["provider"], fields["model"] = request.app[SERVICE].resolve(
            fields.get("provider", conv["provider"]), fields.get("model")
        )
    updated = await request.app[STORE].update_conversation(user_id(request), conv["id"], fields)
    if updated is None:
        raise not_found()
    return web.json_response(updated)


@routes.delete("/api/v1/conversations/{cid}")
async def delete_conversation(request: web.Request) -> web.Response:
    """Delete a conversation (cancelling its live run first)."""
    conv = await load_conversation(request)
    service = request.app[SERVICE]
    live = service.live_run(conv["id"])
    if live is not None:
        await service.cancel(live)
    await request.app[STORE].delete_conversation(user_id(request), conv["id"])
    return web.Response(status=204)


@routes.post("/api/v1/conversations/{cid}/messages")
async def send_blocking(request: web.Request) -> web.Response:
    """The non-streaming send: wait for the whole answer and return it as JSON."""
    cid = check_id(request.match_info["cid"])
    req = parse_send(await json_body(request))
    service = request.app[SERVICE]
    run, _ = await service.start(user_id(request), cid, req)  # 404 unless the user's
    run.subscribe("http")
    try:
        await run.wait_finished()
    finally:
        service.subscriber_left(run, "http")
    message = await request.app[STORE].get_message(user_id(request), cid, run.message_id)
    if message is None:  # deleted meanwhile
        raise not_found("message")
    return web.json_response(
        {"user_message_id": run.user_message_id, "message": public_message(message)}
    )


@routes.delete("/api/v1/conversations/{cid}/messages/{mid}")
async def truncate(request: web.Request) -> web.Response:
    """Delete a message and every later one (to edit and resend a user message)."""
    conv = await load_conversation(request)
    mid = check_id(request.match_info["mid"], "message")
    store = request.app[STORE]
    if await store.get_message(user_id(request), conv["id"], mid) is None:
        raise not_found("message")
    live = request.app[SERVICE].live_run(conv["id"])
    if live is not None:
        raise ApiError(
            409,
            "conflict",
            "An answer is being generated; stop it first.",
            message_id=live.message_id,
        )
    await store.delete_messages_from(conv["id"], mid)
    return web.Response(status=204)


@routes.post("/api/v1/conversations/{cid}/messages/{mid}/cancel")
async def cancel(request: web.Request) -> web.Response:
    """Stop a live run (aborting the upstream request) and answer the message's final state."""
    conv = await load_conversation(request)
    mid = check_id(request.match_info["mid"], "message")
    store = request.app[STORE]
    if await store.get_message(user_id(request), conv["id"], mid) is None:
        raise not_found("message")
    service = request.app[SERVICE]
    run = service.get_run(mid)
    if run is not None:
        await service.cancel(run)
    message = await store.get_message(user_id(request), conv["id"], mid)
    if message is None:
        raise not_found("message")
    return web.json_response({"message": public_message(message)})


def streaming_enabled(request: web.Request) -> None:
    """503 when streaming.enabled is false."""
    from app.keys import SETTINGS

    if not request.app[SETTINGS].streaming.enabled:
        raise ApiError(
            503,
            "streaming_disabled",
            "Streaming is turned off on this server; use POST .../messages instead.",
        )
