"""A fake OpenAI-compatible upstream: paced chat.completions streams, disconnects recorded.

Run as `python -m bench.upstream --port 0`; it prints `port <n> h2 <m>` once listening:
HTTP/1.1 on n, and the same streams over HTTP/2 with prior knowledge (h2c) on m
(bench.upstream_h2).
Each request's token count, pace and id come from its last user message (bench.spec).
A client that goes away mid-stream is noticed at once (handler cancellation) and the
time is recorded on CLOCK_MONOTONIC, which is shared by every process on the machine,
so the load generator can subtract its own cancel time from it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from bench.spec import StreamSpec, parse


class Stats:
    """What the upstream saw: requests, finished streams, client disconnects."""

    def __init__(self) -> None:
        self.requests = 0
        self.h2_requests = 0  # over HTTP/2 (bench.upstream_h2), since start: never reset
        self.completed = 0
        self.active = 0
        self.disconnects: dict[str, float] = {}
        self.received: dict[str, float] = {}  # request arrived (headers and body read)
        self.first_sent: dict[str, float] = {}  # first token handed to the socket

    def as_dict(self) -> dict[str, Any]:
        """JSON-able snapshot."""
        return {
            "requests": self.requests,
            "h2_requests": self.h2_requests,
            "completed": self.completed,
            "active": self.active,
            "disconnects": self.disconnects,
            "received": self.received,
            "first_sent": self.first_sent,
        }


STATS = web.AppKey("stats", Stats)
BATCH = web.AppKey("batch", int)


def frames(spec: StreamSpec, model: str) -> tuple[bytes, bytes, bytes]:
    """The bytes before and after each token's JSON string, and the closing frames."""
    head = orjson.dumps(
        {"id": f"chatcmpl-{spec.id}", "object": "chat.completion.chunk", "created": 0}
    )[:-1]
    model_json = orjson.dumps(model)
    prefix = b"data: " + head + b',"model":' + model_json + b',"choices":[{"index":0,"delta":{'
    suffix = b'},"logprobs":null,"finish_reason":null}]}\n\n'
    usage = orjson.dumps(
        {"prompt_tokens": 10, "completion_tokens": spec.tokens, "total_tokens": spec.tokens + 10}
    )
    tail = (
        b"data: "
        + head
        + b',"model":'
        + model_json
        + b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
        + b"data: "
        + head
        + b',"model":'
        + model_json
        + b',"choices":[],"usage":'
        + usage
        + b"}\n\ndata: [DONE]\n\n"
    )
    return prefix, suffix, tail


async def writes(spec: StreamSpec, model: str, batch: int, stats: Stats) -> AsyncIterator[bytes]:
    """The bytes of each write of one stream, paced as its spec says (HTTP/1.1 and h2).

    Unpaced, `batch` tokens go in each write; paced, one token per write, each on its
    schedule from the start. The first token's send time is recorded.
    """
    prefix, suffix, tail = frames(spec, model)
    yield prefix + b'"role":"assistant","content":""' + suffix
    prefix += b'"content":'
    tokens = [spec.token(i) for i in range(spec.tokens)]
    if spec.pace_ms <= 0:
        stats.first_sent[spec.id] = time.monotonic()
        for start in range(0, len(tokens), batch):
            yield b"".join(prefix + orjson.dumps(t) + suffix for t in tokens[start : start + batch])
    else:
        loop = asyncio.get_running_loop()
        pace = spec.pace_ms / 1000
        t0 = loop.time()
        for i, t in enumerate(tokens):
            delay = t0 + (i + 1) * pace - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if i == 0:
                stats.first_sent[spec.id] = time.monotonic()
            yield prefix + orjson.dumps(t) + suffix
    yield tail


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions with stream=true."""
    stats = request.app[STATS]
    body = orjson.loads(await request.read())
    messages = body.get("messages") or []
    prompt = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    spec = parse(prompt if isinstance(prompt, str) else "") or StreamSpec("none", 8)
    if not body.get("stream"):
        text = spec.expected()
        return web.json_response(
            {
                "id": f"chatcmpl-{spec.id}",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", ""),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": spec.tokens},
            }
        )
    stats.requests += 1
    stats.active += 1
    stats.received[spec.id] = time.monotonic()
    try:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        async for data in writes(spec, str(body.get("model", "")), request.app[BATCH], stats):
            await resp.write(data)
        await resp.write_eof()
        stats.completed += 1
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        stats.disconnects[spec.id] = time.monotonic()
        raise
    finally:
        stats.active -= 1


async def get_stats(request: web.Request) -> web.Response:
    """GET /_bench/stats."""
    return web.Response(
        body=orjson.dumps(request.app[STATS].as_dict()), content_type="application/json"
    )


async def reset(request: web.Request) -> web.Response:
    """POST /_bench/reset: forget everything recorded so far."""
    stats = request.app[STATS]
    stats.requests = stats.completed = 0
    stats.disconnects.clear()
    stats.received.clear()
    stats.first_sent.clear()
    return web.Response(status=204)


def make_app(batch: int = 8) -> web.Application:
    """The upstream application (`batch`: tokens per write when unpaced)."""
    app = web.Application()
    app[STATS] = Stats()
    app[BATCH] = max(1, batch)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/_bench/stats", get_stats)
    app.router.add_post("/_bench/reset", reset)
    return app


async def serve(port: int, batch: int) -> None:
    """Serve until cancelled, printing the port once listening."""
    runner = web.AppRunner(
        make_app(batch), handler_cancellation=True, access_log=None, shutdown_timeout=0.5
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    sockets = runner.addresses
    from bench.upstream_h2 import H2Upstream  # it imports this module

    app = runner.app
    h2 = await asyncio.get_running_loop().create_server(
        lambda: H2Upstream(app[STATS], app[BATCH]), "127.0.0.1", 0, backlog=4096
    )
    print(f"port {sockets[0][1]} h2 {h2.sockets[0].getsockname()[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        h2.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8, help="tokens per write when unpaced")
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
