"""The floor: the least an aiohttp server relaying through the openai SDK can hold per stream.

No runs, no database, no auth, no metrics, no resumes: one handler that asks the
upstream through the same SDK call and HTTP backend as providers/openai_compat.py and
writes each chunk as the same SSE event streamchat sends (so bench.loadgen checks it).
It answers what the server's own memory per stream is measured against:

    python -m bench.bare_relay --port 8081 --upstream http://127.0.0.1:8082/v1

`POST /api/v1/conversations` returns an id; `POST /api/v1/conversations/{id}/stream`
streams. It prints `port <n>` once listening.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import httpx2
import openai
import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from providers.http2 import H2Transport
from providers.openai_compat import ChunkStream

CLIENT = web.AppKey("client", openai.AsyncOpenAI)
_ids = itertools.count(1)


async def create(request: web.Request) -> web.Response:
    """A conversation id (nothing is stored)."""
    return web.json_response({"id": f"c{next(_ids)}"}, status=201)


async def stream(request: web.Request) -> web.StreamResponse:
    """Relay one chat completion as streamchat's events: start, chunks, end."""
    body = await request.json()
    client = request.app[CLIENT]
    mid = f"m{next(_ids)}"
    upstream = await client.post(
        "/chat/completions",
        body={
            "model": "bench",
            "messages": [{"role": "user", "content": body["content"]}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        cast_to=object,
        stream=True,
        stream_cls=ChunkStream,
    )
    resp = EventSourceResponse(allow_all_methods=True, sep="\n", ping_interval=15)
    await resp.prepare(request)
    seq = 1
    await resp.write(
        b"id: 1\ndata: " + orjson.dumps({"type": "start", "message_id": mid, "seq": 1}) + b"\n\n"
    )
    try:
        async for chunk in upstream:
            if not isinstance(chunk, dict) or not chunk.get("choices"):
                continue
            text = chunk["choices"][0].get("delta", {}).get("content")
            if text:
                seq += 1
                event = {"type": "chunk", "message_id": mid, "content": text, "seq": seq}
                await resp.write(f"id: {seq}\ndata: ".encode() + orjson.dumps(event) + b"\n\n")
        seq += 1
        end = {"type": "end", "message_id": mid, "status": "complete", "seq": seq}
        await resp.write(f"id: {seq}\ndata: ".encode() + orjson.dumps(end) + b"\n\n")
    finally:
        await upstream.close()
        resp.stop_streaming()
    return resp


async def healthz(request: web.Request) -> web.Response:
    """Ready."""
    return web.json_response({"ok": True})


def make_app(upstream: str, backend: str = "aiohttp") -> web.Application:
    """The relay, with the SDK client set up as providers/openai_compat.py sets its own.

    `backend="httpx"`: the SDK's default HTTP backend (httpcore) instead, for comparison;
    `backend="http2"`: providers/http2.py, as a provider with `http2 = true` uses it.
    """
    app = web.Application()
    # unbounded pools (0 is "no limit" to the aiohttp backend, None to httpcore)
    unbounded = 0 if backend == "aiohttp" else None
    limits = httpx2.Limits(max_connections=unbounded, max_keepalive_connections=100)
    app[CLIENT] = openai.AsyncOpenAI(
        api_key="none",
        base_url=upstream,
        max_retries=0,
        timeout=httpx2.Timeout(connect=10, read=None, write=10, pool=10),
        http_client=(
            openai.DefaultAioHttpClient(limits=limits)
            if backend == "aiohttp"
            else openai.DefaultAsyncHttpxClient(transport=H2Transport())
            if backend == "http2"
            else openai.DefaultAsyncHttpxClient(limits=limits)
        ),
    )
    app.router.add_post("/api/v1/conversations", create)
    app.router.add_post("/api/v1/conversations/{cid}/stream", stream)
    app.router.add_get("/api/v1/healthz", healthz)
    return app


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted."""
    p = argparse.ArgumentParser(prog="python -m bench.bare_relay")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="the upstream's base URL (…/v1)")
    p.add_argument("--backend", choices=("aiohttp", "httpx", "http2"), default="aiohttp")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(
        make_app(args.upstream, args.backend),
        host="127.0.0.1",
        port=args.port,
        backlog=4096,
        access_log=None,
        print=lambda _: print(f"port {args.port}", flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
