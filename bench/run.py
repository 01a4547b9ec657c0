"""`python -m bench.run`: every level against the upstream directly and through streamchat.

The server runs as a real process (`python run.py --config <tmp toml>`) pinned to one
core; the fake upstream and this load generator share the other core. Results go to
`<out>/bench.json` and `<out>/bench.md`; the markdown table is also printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench import litellm, loadgen, procs
from bench.loadgen import StreamResult, percentile, summarize
from bench.spec import StreamSpec


@dataclass(frozen=True)
class Sizes:
    """How big each level is."""

    ttft_n: int
    tput_c: int
    tput_n: int
    paced_c: int
    paced_n: int
    scale_c: int
    scale_tokens: int
    cancel_n: int
    local_n: int  # rounds of the local level: a batch of 1, then of 4, streams per side each


FULL = Sizes(300, 32, 1500, 100, 1000, 10_000, 180, 40, 10)
QUICK = Sizes(20, 8, 40, 20, 40, 200, 4, 5, 1)
LOCAL_MAX_TOKENS = 128
LOCAL_PROMPT = "Write a long story about a lighthouse keeper and a storm."

TARGETS = {
    "relay_tokens_per_s": ">= 15000",
    "cpu_s_per_1m_tokens": "<= 65",
    "ttft_added_1_stream_p50_ms": "<= 3",
    "ttft_added_100_streams_p50_ms": "<= 20",
    "ttft_added_100_streams_p99_ms": "<= 50",
    "scale_errors": "== 0",
    # streams that never were open all at once: a stream that waited for its start until
    # earlier ones had finished is not one of 10,000 *concurrent* streams
    "scale_not_open_at_once": "== 0",
    "rss_per_open_stream_kb": "<= 40",
    "idle_rss_mb": "<= 80",
    "cancel_http_p50_ms": "<= 5",
    "cancel_http_max_ms": "<= 20",
    "cancel_ws_p50_ms": "<= 5",
    "cancel_ws_max_ms": "<= 20",
    "local_1_stream_ratio": ">= 0.95",
    "local_4_over_1_stream": ">= 1.000001",
}


def _holds(value: float | None, rule: str) -> bool | None:
    if value is None:
        return None
    op, bound = rule.split()
    limit = float(bound)
    return {">=": value >= limit, "<=": value <= limit, "==": value == limit}[op]


class Bench:
    """One benchmark run: the processes, the sessions and the results."""

    def __init__(self, args: argparse.Namespace, tmp: str) -> None:
        self.args = args
        sizes = QUICK if args.quick else FULL
        for item in args.size or ():
            key, _, value = item.partition("=")
            sizes = dataclasses.replace(sizes, **{key: int(value)})
        self.sizes = sizes
        self.tmp = tmp
        self.server_cpus = [] if args.no_pin else [args.server_cpu]
        self.client_cpus = [] if args.no_pin else [args.client_cpu]
        self.results: dict[str, Any] = {}
        self.cores: dict[str, list[int]] = {}
        self.counter = 0
        self.level_name = ""
        self.generation = 0  # server processes started after the first
        self.sc: aiohttp.ClientSession  # to streamchat
        self.dc: aiohttp.ClientSession  # to the upstream directly
        self.server: procs.Proc
        self.bare: procs.Proc  # bench.bare_relay, during the scale level
        self.bare_base = ""
        self.litellm_exe: str | None = None  # with --litellm: its proxy is a third column
        self.litellm: procs.Proc | None = None
        self.litellm_base = ""
        self.litellm_idle_kb: int | None = None
        self.lc: aiohttp.ClientSession  # to LiteLLM (its master key in every request)
        self.upstream: procs.Proc
        self.settle = 0.1 if args.quick else 0.5  # seconds of quiet before each measurement

    def spec(self, tokens: int, pace_ms: float = 0.0) -> StreamSpec:
        """A fresh stream spec with a unique id."""
        self.counter += 1
        return StreamSpec(f"s{self.counter}", tokens, pace_ms)

    async def conversations(self, n: int, base: str | None = None) -> list[str]:
        """Create n conversations (setup, not measured)."""
        out: list[str] = []
        base = base or self.base

        async def make(_: int) -> None:
            async with self.sc.post(f"{base}/api/v1/conversations", json={}) as resp:
                if resp.status != 201:
                    raise RuntimeError(f"create conversation: {resp.status} {await resp.text()}")
                out.append((await resp.json())["id"])

        for start in range(0, n, 200):
            await asyncio.gather(*(make(i) for i in range(start, min(n, start + 200))))
        return out

    async def both(
        self,
        name: str,
        concurrency: int,
        total: int,
        tokens: int,
        pace_ms: float,
        time_limit: float,
        max_starting: int | None = None,
        ramp_s: float = 0.0,
        litellm_total: int | None = None,
    ) -> dict[str, Any]:
        """Run one level directly against the upstream, then through streamchat.

        With --litellm, then through LiteLLM's proxy too (`litellm_total` streams: it
        relays ~30 times slower, so fewer keep the level's length reasonable; 0: not here).
        """
        level: dict[str, Any] = {
            "concurrency": concurrency,
            "streams": total,
            "tokens_per_stream": tokens,
            "pace_ms": pace_ms,
            "ramp_s": ramp_s,
        }
        for target in ("direct", "streamchat"):
            level[target] = await self.one_target(
                target, concurrency, total, tokens, pace_ms, time_limit, max_starting, ramp_s
            )
            print(f"  {name} {target}: {_brief(level[target])}", flush=True)
        if self.litellm_exe and litellm_total != 0:
            level["litellm"] = await self.litellm_target(
                name,
                concurrency,
                litellm_total or total,
                tokens,
                pace_ms,
                time_limit,
                max_starting,
                ramp_s,
            )
        return level

    @contextlib.asynccontextmanager
    async def litellm_running(self) -> AsyncIterator[None]:
        """LiteLLM's proxy on the server's core for one measurement (streamchat idles).

        Started anew each time, so its background work never runs beside streamchat's
        measurements; its idle RSS is read at the first start.
        """
        assert self.litellm_exe is not None
        self.litellm, self.litellm_base = await litellm.start(
            self.litellm_exe, self.server_cpus, self.tmp, f"{self.up_base}/v1"
        )
        try:
            if self.litellm_idle_kb is None:
                await asyncio.sleep(self.settle * 2)
                self.litellm_idle_kb = procs.rss_kb(self.litellm.pid)
            await self.one_target("litellm", 4, 20, 16, 0, 60, None)  # warm, as the server
            yield
        finally:
            self.litellm.stop()
            self.litellm = None

    async def litellm_target(
        self,
        name: str,
        concurrency: int,
        total: int,
        tokens: int,
        pace_ms: float,
        time_limit: float,
        max_starting: int | None,
        ramp_s: float = 0.0,
    ) -> dict[str, Any]:
        """One measurement through a freshly started LiteLLM proxy (as one_target)."""
        async with self.litellm_running():
            out = await self.one_target(
                "litellm", concurrency, total, tokens, pace_ms, time_limit, max_starting, ramp_s
            )
        print(f"  {name} litellm: {_brief(out)}", flush=True)
        return out

    async def one_target(
        self,
        target: str,
        concurrency: int,
        total: int,
        tokens: int,
        pace_ms: float,
        time_limit: float,
        max_starting: int | None,
        ramp_s: float = 0.0,
    ) -> dict[str, Any]:
        """Run `total` streams against one target, sampling the process that serves them.

        Targets: "direct" (the upstream), "streamchat", "bare" (bench.bare_relay: the
        least that aiohttp and the openai SDK hold per relayed stream, when it runs),
        "litellm" (LiteLLM's proxy, with --litellm).
        """
        specs = [self.spec(tokens, pace_ms) for _ in range(total)]
        open_now = 0
        peak_open = 0
        all_open_rss = 0  # RSS when the most streams were open (all of them, normally)
        relay, base = self.server, self.base  # the process in between, and its URL
        if target == "bare":
            relay, base = self.bare, self.bare_base
        elif target == "litellm":
            assert self.litellm is not None
            relay, base = self.litellm, self.litellm_base
        pid = self.upstream.pid if target == "direct" else relay.pid
        open_at_rss = 0  # how many were open at that reading

        def streaming(_: StreamResult) -> None:
            nonlocal open_now, peak_open, all_open_rss, open_at_rss
            open_now += 1
            if open_now > peak_open:
                peak_open = open_now
                # every 1% of the way and at the end: a level where a few streams failed
                # still measures its peak (reading /proc per stream would cost the client)
                if peak_open == concurrency or peak_open % max(1, concurrency // 100) == 0:
                    all_open_rss = procs.rss_kb(pid)
                    open_at_rss = peak_open

        if target in ("streamchat", "bare"):
            cids = await self.conversations(total, base)

            async def one(i: int, on_open: loadgen.OnToken) -> StreamResult:
                nonlocal open_now
                res = await loadgen.sse_stream(
                    self.sc, base, cids[i], specs[i], on_first=streaming, on_open=on_open
                )
                if res.ttft is not None:
                    open_now -= 1  # it counted as streaming from its first token to its end
                return res

        else:  # the upstream itself, or LiteLLM: both speak the OpenAI API
            session, url = (self.lc, base) if target == "litellm" else (self.dc, self.up_base)

            async def one(i: int, on_open: loadgen.OnToken) -> StreamResult:
                nonlocal open_now
                res = await loadgen.direct_stream(
                    session, url, specs[i], on_first=streaming, on_open=on_open
                )
                if res.ttft is not None:
                    open_now -= 1  # it counted as streaming from its first token to its end
                return res

        await asyncio.sleep(self.settle)  # let the previous level's connections settle
        async with self.dc.post(f"{self.up_base}/_bench/reset") as resp:
            resp.raise_for_status()
        profiler = None
        if self.args.profile and target == "streamchat" and self.level_name:
            profiler = procs.start_profiler(
                self.server.pid, os.path.join(self.args.profile, f"{self.level_name}.txt")
            )
        own0 = os.times()
        try:
            with (
                procs.Sampler(relay.pid) as srv,
                procs.Sampler(self.upstream.pid) as ups,
            ):
                results, wall = await loadgen.run_streams(
                    one, concurrency, total, time_limit, max_starting, ramp_s
                )
        finally:
            if profiler is not None:
                procs.stop_profiler(profiler)
        own1 = os.times()
        async with self.dc.get(f"{self.up_base}/_bench/stats") as resp:
            up_stats = await resp.json()
        out = summarize(results, wall, up_stats)
        served = ups if target == "direct" else srv
        out.update(
            server_cpu_s=round(srv.cpu, 3),
            server_cpu_util=round(srv.cpu / wall, 3) if wall else None,
            upstream_cpu_util=round(ups.cpu / wall, 3) if wall else None,
            loadgen_cpu_util=round(
                ((own1.user - own0.user) + (own1.system - own0.system)) / wall, 3
            )
            if wall
            else None,
            rss_before_kb=served.rss0_kb,
            rss_peak_kb=served.peak_kb,
            peak_open=peak_open,
        )
        if all_open_rss:
            out["rss_all_open_kb"] = all_open_rss
            out["open_at_rss"] = open_at_rss
        if out["tokens"]:
            out["server_cpu_s_per_1m_tokens"] = round(srv.cpu / out["tokens"] * 1e6, 2)
        return out

    # -- levels --------------------------------------------------------------------

    async def warmup(self) -> None:
        """A few streams each way so imports and pools are warm before measuring."""
        n = 4 if self.args.quick else 20
        await self.one_target("direct", 4, n, 16, 0, 60, None)
        await self.one_target("streamchat", 4, n, 16, 0, 60, None)

    async def level_ttft(self) -> dict[str, Any]:
        """TTFT added at one stream (fast upstream, short answers)."""
        return await self.both("ttft_1_stream", 1, self.sizes.ttft_n, 16, 0, 300)

    async def level_throughput(self) -> dict[str, Any]:
        """Relayed tokens/s and server CPU per token with an unpaced upstream."""
        s = self.sizes
        return await self.both(
            "throughput",
            s.tput_c,
            s.tput_n,
            200,
            0,
            300,
            litellm_total=max(s.tput_c, s.tput_n // 10),
        )

    async def level_paced(self) -> dict[str, Any]:
        """TTFT at 100 streams with a 20 ms/token upstream (steady state: starts ramped)."""
        s = self.sizes
        return await self.both(
            "paced_100",
            s.paced_c,
            s.paced_n,
            50,
            20,
            300,
            ramp_s=1.0,
            litellm_total=max(s.paced_c, s.paced_n // 5),
        )

    async def level_scale(self) -> dict[str, Any]:
        """10,000 concurrent open streams at 1 token/s: errors and RSS per open stream."""
        s = self.sizes
        # a fresh process: earlier levels' answers (kept 120 s for resumes) would be freed
        # during this level and hide the memory the open streams take
        await self.fresh_server()
        level = await self.both(
            "scale",
            s.scale_c,
            s.scale_c,
            s.scale_tokens,
            1000,
            s.scale_tokens + 420,
            # at most this many connecting at once (the server's accept backlog is 1024)
            max_starting=1000,
            litellm_total=0,  # below, smaller
        )
        # The floor, in the same conditions: aiohttp and the openai SDK relaying with
        # nothing else (no runs, database, auth, resumes). streamchat is idle meanwhile.
        # the same protocol to the upstream as streamchat's provider
        self.bare, self.bare_base = procs.start_bare_relay(
            self.server_cpus,
            self.tmp,
            f"http://127.0.0.1:{self.up_port}/v1",
            "http2" if self.args.http2 else "aiohttp",
        )
        try:
            await self.one_target("bare", 4, 20, 16, 0, 60, None)  # warm, as the server
            level["bare"] = await self.one_target(
                "bare", s.scale_c, s.scale_c, s.scale_tokens, 1000, s.scale_tokens + 420, 1000
            )
            print(f"  scale bare: {_brief(level['bare'])}", flush=True)
        finally:
            self.bare.stop()
        if self.litellm_exe:
            # LiteLLM relays ~1,500 tokens/s on one core: 10,000 streams of 1 token/s would
            # measure its backlog, so its memory per stream is read at 1,000 shorter ones
            c, tokens = min(s.scale_c, 1000), min(s.scale_tokens, 60)
            level["litellm"] = await self.litellm_target(
                "scale", c, c, tokens, 1000, tokens + 420, 1000
            )
        for target in ("direct", "streamchat", "bare", "litellm"):
            if target not in level:
                continue
            t = level[target]
            if t.get("rss_all_open_kb"):
                t["rss_per_open_stream_kb"] = round(
                    (t["rss_all_open_kb"] - t["rss_before_kb"]) / t["open_at_rss"], 2
                )
        return level

    async def level_local(self) -> dict[str, Any]:
        """The local model: tokens/s of xllamacpp alone vs through streamchat, 1 and 4 streams.

        Both sides use every core and the same runtime settings (LocalRuntime with the
        default [local] settings), answers capped at LOCAL_MAX_TOKENS. Both are loaded at
        once and their batches alternate (alone, streamchat, streamchat, alone, ...), so a
        drift in the shared machine's speed falls on both sides alike. Text is not checked
        (a real model's), only that every stream ends complete.
        """
        n = self.sizes.local_n
        alone = procs.Proc("llama", [sys.executable, "-m", "bench.llama_alone"], [], self.tmp)
        alone.start()
        # a new connection per request: llama.cpp's server may close an idle one just
        # as it is reused, which is not what this level measures
        fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        try:
            line = alone.read_line(b"", timeout=120)
            if not line.startswith("address "):
                return {"skipped": line}
            base = line.split(" ", 1)[1]
            await self.fresh_server(local=True)
            cids = iter(await self.conversations(2 + 5 * n))

            async def direct(i: int, on_open: loadgen.OnToken) -> StreamResult:
                return await loadgen.direct_stream(
                    fresh,
                    base,
                    StreamSpec("local", 0, text=LOCAL_PROMPT),
                    on_open=on_open,
                    max_tokens=LOCAL_MAX_TOKENS,
                    check=False,
                )

            async def relayed(i: int, on_open: loadgen.OnToken) -> StreamResult:
                return await loadgen.sse_stream(
                    self.sc,
                    self.base,
                    next(cids),
                    StreamSpec("local", 0, text=LOCAL_PROMPT),
                    on_open=on_open,
                    options={"max_tokens": LOCAL_MAX_TOKENS},
                    check=False,
                )

            sides = {"alone": direct, "streamchat": relayed}
            for one in sides.values():
                await loadgen.run_streams(one, 1, 1, 120)  # warm-up
            out: dict[str, Any] = {"max_tokens": LOCAL_MAX_TOKENS, "rounds": n}
            for c in (1, 4):
                runs: dict[str, tuple[list[StreamResult], float]] = {k: ([], 0.0) for k in sides}
                for r in range(n):
                    for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
                        res, wall = await loadgen.run_streams(sides[name], c, c, 600)
                        got, total = runs[name]
                        runs[name] = (got + res, total + wall)
                for name, (res, wall) in runs.items():
                    out[f"{name}_{c}"] = summarize(res, wall)
        finally:
            await fresh.close()
            alone.stop()
        for key in ("alone_1", "alone_4", "streamchat_1", "streamchat_4"):
            print(f"  local {key}: {_brief_local(out[key])}", flush=True)
        return out

    async def level_cancel(self) -> dict[str, Any]:
        """Client cancel (HTTP, WebSocket; direct, LiteLLM: closing the response) → upstream
        disconnect."""
        n = self.sizes.cancel_n
        out: dict[str, Any] = {"streams": n}
        for mode in ("direct", "http", "ws", "litellm"):
            if mode == "litellm":
                if not self.litellm_exe:
                    continue
                async with self.litellm_running():
                    out[mode] = await self.cancel_mode(mode, n)
            else:
                out[mode] = await self.cancel_mode(mode, n)
            print(f"  cancel {mode}: {out[mode]}", flush=True)
        return out

    async def cancel_mode(self, mode: str, n: int) -> dict[str, Any]:
        """`n` cancels one way; their latencies to the upstream's disconnect."""
        lat: list[float] = []
        errors: list[str] = []
        for _ in range(n):
            spec = self.spec(2000, 10)
            try:
                async with asyncio.timeout(30):
                    t0 = await self.cancel_one(mode, spec)
                    lat.append(await self.disconnect_time(spec.id) - t0)
            except (TimeoutError, RuntimeError, aiohttp.ClientError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:120])
        return {
            "ok": len(lat),
            "errors": errors[:5],
            "p50_ms": _ms(percentile(lat, 50)),
            "p90_ms": _ms(percentile(lat, 90)),
            "max_ms": _ms(max(lat) if lat else None),
        }

    async def cancel_one(self, mode: str, spec: StreamSpec) -> float:
        """Start a paced stream, read 3 tokens, cancel; return the cancel time."""
        if mode in ("direct", "litellm"):
            session, url = (
                (self.lc, self.litellm_base) if mode == "litellm" else (self.dc, self.up_base)
            )
            async with session.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": "bench",
                    "messages": [{"role": "user", "content": spec.prompt()}],
                    "stream": True,
                },
            ) as resp:
                await _read_until(resp, b'"content":', 4)
                t0 = time.monotonic()
                resp.close()
                return t0
        (cid,) = await self.conversations(1)
        if mode == "http":
            async with self.sc.post(
                f"{self.base}/api/v1/conversations/{cid}/stream", json={"content": spec.prompt()}
            ) as resp:
                head = await _read_until(resp, b'"type":"chunk"', 3)
                mid = json.loads(head.split(b"data: ", 1)[1].split(b"\n", 1)[0])["message_id"]
                t0 = time.monotonic()
                async with self.sc.post(
                    f"{self.base}/api/v1/conversations/{cid}/messages/{mid}/cancel"
                ) as cresp:
                    if cresp.status != 200:
                        raise RuntimeError(f"cancel answered {cresp.status}")
                return t0
        async with self.sc.ws_connect(f"{self.base}/ws") as ws:
            await ws.send_json({"op": "send", "conversation_id": cid, "content": spec.prompt()})
            mid, chunks = None, 0
            while chunks < 3:
                ev = json.loads((await ws.receive()).data)
                if ev["type"] == "start":
                    mid = ev["message_id"]
                elif ev["type"] == "chunk":
                    chunks += 1
                elif ev["type"] in ("end", "error"):
                    raise RuntimeError(f"stream ended early: {ev}")
            t0 = time.monotonic()
            await ws.send_json({"op": "cancel", "message_id": mid})
            while True:
                ev = json.loads((await ws.receive()).data)
                if ev["type"] in ("end", "error"):
                    if ev.get("status") != "cancelled":
                        raise RuntimeError(f"cancel ended {ev.get('status')}")
                    return t0

    async def disconnect_time(self, stream_id: str) -> float:
        """When the upstream saw the client of `stream_id` go away (polls, bounded)."""
        for _ in range(200):
            async with self.dc.get(f"{self.up_base}/_bench/stats") as resp:
                stats = await resp.json()
            if stream_id in stats["disconnects"]:
                return float(stats["disconnects"][stream_id])
            await asyncio.sleep(0.01)
        raise RuntimeError("upstream never saw the disconnect")

    # -- the whole run -------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Start the processes, run the chosen levels, stop everything."""
        args = self.args
        self.fd_limit = procs.raise_fd_limit(65_536)
        if args.litellm:
            self.litellm_exe = litellm.ensure_installed()
        if self.client_cpus:
            procs.pin(self.client_cpus)
        self.upstream, up_port, h2_port = procs.start_upstream(self.client_cpus, self.tmp)
        self.up_base = f"http://127.0.0.1:{up_port}"
        # the port streamchat's provider uses: the same streams over h2c with --http2
        self.up_port = h2_port if args.http2 else up_port
        self.port = procs.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = os.path.join(self.tmp, "bench.toml")
        procs.server_config(
            self.config,
            self.port,
            self.up_port,
            os.path.join(self.tmp, "bench.db"),
            http2=args.http2,
        )
        try:
            self.server = await procs.start_server(
                self.config, self.port, self.server_cpus, self.tmp
            )
            self.note_cores()
            try:
                return await self._levels(args)
            finally:
                self.server.stop()
        finally:
            self.upstream.stop()
            os.makedirs(args.out, exist_ok=True)
            for name in os.listdir(self.tmp):  # keep the logs next to the results
                if name.endswith(".log"):
                    shutil.copy(os.path.join(self.tmp, name), args.out)

    def note_cores(self) -> None:
        """Record the cores each process really runs on (read back, not assumed)."""
        self.cores = {
            "server": sorted(os.sched_getaffinity(self.server.pid)),
            "upstream": sorted(os.sched_getaffinity(self.upstream.pid)),
            "loadgen": sorted(os.sched_getaffinity(0)),
        }
        shared = set(self.cores["server"]) & set(self.cores["loadgen"])
        if self.server_cpus and self.client_cpus and shared:
            raise RuntimeError(f"the server shares cores {sorted(shared)} with the load generator")

    async def fresh_server(self, local: bool = False) -> None:
        """Replace the server with a new process on a new database (a clean RSS baseline).

        `local`: with the local model as the default provider, on every core (llama.cpp's
        threads inherit the process's affinity).
        """
        self.server.stop()
        self.generation += 1
        db = os.path.join(self.tmp, f"bench{self.generation}.db")
        procs.server_config(
            self.config, self.port, self.up_port, db, local=local, http2=self.args.http2
        )
        self.server = await procs.start_server(
            self.config,
            self.port,
            [] if local else self.server_cpus,
            self.tmp,
            wait=180.0,
            name=f"server{self.generation}",
        )
        if not local:
            self.note_cores()
        await self.sc.close()
        self.sc = _session()
        if not local:
            await self.one_target("streamchat", 4, 20, 16, 0, 60, None)  # warm, as at start

    async def _levels(self, args: argparse.Namespace) -> dict[str, Any]:
        await asyncio.sleep(self.settle * 2)
        idle_rss = procs.rss_kb(self.server.pid)  # started, nothing asked of it yet
        self.sc, self.dc = _session(), _session()
        self.lc = _session(litellm.HEADERS)
        try:
            await self.warmup()
            levels: dict[str, Any] = {}
            chosen = args.levels.split(",")
            table: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
                "ttft": self.level_ttft,
                "throughput": self.level_throughput,
                "paced": self.level_paced,
                "cancel": self.level_cancel,
                "scale": self.level_scale,
                "local": self.level_local,
            }
            for name in chosen:
                if name not in table:
                    raise SystemExit(f"unknown level {name!r}; choose from {', '.join(table)}")
                print(f"level {name}", flush=True)
                self.level_name = name
                levels[name] = await table[name]()
            async with self.dc.get(f"{self.up_base}/_bench/stats") as resp:
                upstream = await resp.json()
        finally:
            await self.sc.close()
            await self.dc.close()
            await self.lc.close()
        return {
            # requests the upstream served over HTTP/2 in the whole run (only streamchat
            # with --http2 speaks it)
            "upstream_h2_requests": upstream["h2_requests"],
            "idle_rss_kb": idle_rss,
            "litellm_idle_rss_kb": self.litellm_idle_kb,
            "litellm_version": litellm.VERSION if self.litellm_exe else None,
            "levels": levels,
        }


def _session(headers: dict[str, str] | None = None) -> aiohttp.ClientSession:
    """A client session with no connection limit and no total timeout."""
    return aiohttp.ClientSession(
        headers=headers,
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=300),
    )


async def _read_until(resp: aiohttp.ClientResponse, marker: bytes, count: int) -> bytes:
    """Read a streaming body until `marker` was seen `count` times; return what was read."""
    buf = b""
    async for data in resp.content.iter_any():
        buf += data
        if buf.count(marker) >= count:
            return buf
    raise RuntimeError("stream ended before the cancel point")


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def _brief_local(t: dict[str, Any]) -> str:
    return f"ok {t['ok']}/{t['streams']} tokens {t['tokens']} tok/s {t['tokens_per_s']}"


def _brief(t: dict[str, Any]) -> str:
    return (
        f"ok {t['ok']}/{t['streams']} tok/s {t['tokens_per_s']} "
        f"ttft p50 {t['ttft_ms']['p50']} p99 {t['ttft_ms']['p99']} ms "
        f"(to upstream p50 {t['to_upstream_ms']['p50']}, back {t['first_token_back_ms']['p50']}) "
        f"server cpu {t['server_cpu_util']} upstream cpu {t['upstream_cpu_util']} "
        f"loadgen cpu {t['loadgen_cpu_util']}" + (f" errors {t['errors']}" if t["errors"] else "")
    )


def _rate(t: dict[str, Any]) -> float:
    """Tokens/s from the token count and wall time (the shown tok/s is rounded to 0.1)."""
    return float(t["tokens"]) / float(t["wall_s"])


def _floor3(ratio: float) -> float:
    """A ratio to 3 decimals, rounded down: rounding must never make a target hold."""
    return math.floor(ratio * 1000) / 1000


def headline(res: dict[str, Any]) -> dict[str, float | None]:
    """The figures the targets are about, computed from a result; LiteLLM's, prefixed
    `litellm_`, when it ran (a comparison, not a target)."""
    lv = res["levels"]
    out: dict[str, float | None] = {"idle_rss_mb": round(res["idle_rss_kb"] / 1024, 1)}
    out.update(_relay_figures(lv, "streamchat"))
    if "scale" in lv:
        sc = lv["scale"]["streamchat"]
        out["scale_errors"] = float(sc["failed"])
        out["scale_peak_open"] = float(sc["peak_open"])
        out["scale_not_open_at_once"] = float(sc["streams"] - sc["peak_open"])
        if "bare" in lv["scale"]:
            out["bare_relay_rss_per_open_stream_kb"] = lv["scale"]["bare"].get(
                "rss_per_open_stream_kb"
            )
    lo = lv.get("local", {})
    if "streamchat_1" in lo:
        one = _rate(lo["streamchat_1"])
        out["local_1_stream_ratio"] = _floor3(one / _rate(lo["alone_1"]))
        out["local_4_over_1_stream"] = _floor3(_rate(lo["streamchat_4"]) / one)
    out.update(_cancel_figures(lv, "http", "cancel_http"))
    out.update(_cancel_figures(lv, "ws", "cancel_ws"))
    if res.get("litellm_idle_rss_kb"):
        out["litellm_idle_rss_mb"] = round(res["litellm_idle_rss_kb"] / 1024, 1)
    out.update({f"litellm_{k}": v for k, v in _relay_figures(lv, "litellm").items()})
    # LiteLLM's cancel is the client closing its stream
    out.update(_cancel_figures(lv, "litellm", "litellm_cancel"))
    return out


def _cancel_figures(lv: dict[str, Any], mode: str, key: str) -> dict[str, float | None]:
    """p50 and max of one way of cancelling, when it ran."""
    c = lv.get("cancel", {}).get(mode)
    return {f"{key}_p50_ms": c["p50_ms"], f"{key}_max_ms": c["max_ms"]} if c else {}


def _relay_figures(lv: dict[str, Any], target: str) -> dict[str, float | None]:
    """Tokens/s, CPU per token, TTFT added over direct and RSS per stream of one relay."""
    out: dict[str, float | None] = {}
    if target in lv.get("throughput", {}):
        t = lv["throughput"][target]
        out["relay_tokens_per_s"] = t["tokens_per_s"] if t["failed"] == 0 else 0.0
        out["cpu_s_per_1m_tokens"] = t.get("server_cpu_s_per_1m_tokens")
    for key, name in (("ttft", "1_stream"), ("paced", "100_streams")):
        if target in lv.get(key, {}):
            d, t = lv[key]["direct"]["ttft_ms"], lv[key][target]["ttft_ms"]
            for p in ("p50", "p99"):
                if d[p] is not None and t[p] is not None:
                    out[f"ttft_added_{name}_{p}_ms"] = round(t[p] - d[p], 3)
    if target in lv.get("scale", {}):
        out["rss_per_open_stream_kb"] = lv["scale"][target].get("rss_per_open_stream_kb")
    return out


def markdown(res: dict[str, Any]) -> str:
    """The result as markdown: targets, then each level side by side."""
    m = res["machine"]
    lines = [
        f"Run {res['started']} · `{res['command']}` · {m['nproc']} cores, {m['cpu']} · "
        f"Python {m['python']} · cores (read from each process's affinity): server "
        f"{m['cores']['server']}, upstream {m['cores']['upstream']}, load generator "
        f"{m['cores']['loadgen']} · idle cores: {m.get('idle', 'not recorded')} · "
        f"streamchat to the upstream: {res.get('provider_http', 'HTTP/1.1')}",
        "",
        "| target | measured | goal | holds |",
        "|---|---|---|---|",
    ]
    heads = res["headline"]
    for key, rule in TARGETS.items():
        value = heads.get(key)
        ok = _holds(value, rule)
        mark = "—" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {key} | {value if value is not None else 'not run'} | {rule} | {mark} |")
    for name, level in res["levels"].items():
        if name == "local":
            lines += [
                "",
                f"**local** (SmolLM2-135M, answers of at most {LOCAL_MAX_TOKENS} "
                "tokens, every core)",
                "",
            ]
            if "skipped" in level:
                lines.append(f"skipped: {level['skipped']}")
                continue
            lines += ["| | xllamacpp alone | through streamchat |", "|---|---|---|"]
            for c in (1, 4):
                a, b = level[f"alone_{c}"], level[f"streamchat_{c}"]
                lines.append(
                    f"| {c} stream{'s' if c > 1 else ''}: tok/s (ok) | {a['tokens_per_s']} "
                    f"({a['ok']}/{a['streams']}) | {b['tokens_per_s']} ({b['ok']}/{b['streams']}) |"
                )
            continue
        if name == "cancel":
            lines += ["", f"**{name}** ({level['streams']} each)", ""]
            lines += ["| | p50 ms | p90 ms | max ms | ok |", "|---|---|---|---|---|"]
            for mode in ("direct", "http", "ws", "litellm"):
                if mode not in level:
                    continue
                c = level[mode]
                lines.append(
                    f"| {mode} | {c['p50_ms']} | {c['p90_ms']} | {c['max_ms']} | {c['ok']} |"
                )
            continue
        lines += [
            "",
            f"**{name}**: {level['concurrency']} concurrent, {level['streams']} streams of "
            f"{level['tokens_per_stream']} tokens, upstream pace {level['pace_ms']:g} ms/token"
            + (f", first starts spread over {level['ramp_s']:g} s" if level["ramp_s"] else ""),
            "",
        ]
        columns = {
            "direct": "direct",
            "streamchat": "streamchat",
            "bare": "bare relay (aiohttp + openai SDK only)",  # the scale level's floor
            "litellm": "LiteLLM proxy",
        }
        names = [k for k in columns if k in level]
        sides = [level[k] for k in names]
        lines += [
            "| | " + " | ".join(columns[k] for k in names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        rows: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
            ("ok / streams", lambda t: f"{t['ok']} / {t['streams']}"),
            ("tokens/s", lambda t: t["tokens_per_s"]),
            ("TTFT p50 / p99 ms", lambda t: f"{t['ttft_ms']['p50']} / {t['ttft_ms']['p99']}"),
            ("ITL p50 / p99 ms", lambda t: f"{t['itl_ms']['p50']} / {t['itl_ms']['p99']}"),
            ("server CPU (util)", lambda t: f"{t['server_cpu_s']} s ({t['server_cpu_util']})"),
            (
                "upstream / loadgen CPU util",
                lambda t: f"{t['upstream_cpu_util']} / {t['loadgen_cpu_util']}",
            ),
            (
                "serving process RSS before / peak MB",
                lambda t: f"{t['rss_before_kb'] / 1024:.1f} / {t['rss_peak_kb'] / 1024:.1f}",
            ),
        ]
        if name == "scale":
            rows.append(("peak open streams", lambda t: t["peak_open"]))
            rows.append(("RSS per open stream KB", lambda t: t.get("rss_per_open_stream_kb")))
        if name == "throughput":
            rows.append(
                ("server CPU s per 1M tokens", lambda t: t.get("server_cpu_s_per_1m_tokens"))
            )
        for label, get in rows:
            lines.append("| " + " | ".join([label, *(str(get(t)) for t in sides)]) + " |")
        errs = {k: v for t in sides for k, v in t["errors"].items()}
        if errs:
            lines.append(f"\nerrors: `{errs}`")
        if "litellm" in level and level["litellm"]["streams"] != level["streams"]:
            t = level["litellm"]
            each = t["tokens"] // max(1, t["ok"])
            lines.append(f"\nLiteLLM ran {t['streams']} streams (of {each} tokens) here.")
    lines += _litellm_lines(res)
    return "\n".join(lines) + "\n"


def _litellm_lines(res: dict[str, Any]) -> list[str]:
    """LiteLLM's figures beside the targets, when it ran."""
    if not res.get("litellm_version"):
        return []
    heads = res["headline"]
    lines = [
        "",
        f"**LiteLLM proxy {res['litellm_version']}** (one worker, on the server's core, "
        "same upstream, same load generator; a comparison, not a target)",
        "",
        "| figure | LiteLLM | streamchat |",
        "|---|---|---|",
    ]
    for key, value in heads.items():
        if key.startswith("litellm_"):
            name = key.removeprefix("litellm_")
            # LiteLLM's cancel is the client closing its stream, as our HTTP cancel
            ours = heads.get(name.replace("cancel_", "cancel_http_"))
            lines.append(f"| {name} | {value} | {ours} |")
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The bench's command line."""
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness works")
    p.add_argument(
        "--levels",
        default="ttft,throughput,paced,cancel,scale,local",
        help="comma list of ttft, throughput, paced, cancel, scale, local (local restarts "
        "the server with the local model; keep it last)",
    )
    p.add_argument("--out", default=os.path.join(procs.ROOT, "bench", "results"))
    p.add_argument(
        "--size",
        action="append",
        metavar="NAME=N",
        help=f"override one size ({', '.join(f.name for f in dataclasses.fields(Sizes))})",
    )
    p.add_argument(
        "--litellm",
        action="store_true",
        help=f"also relay through LiteLLM's proxy {litellm.VERSION} (installed from PyPI "
        "into bench/.venv-litellm on first use)",
    )
    p.add_argument(
        "--http2",
        action="store_true",
        help="streamchat's provider speaks HTTP/2 to the upstream (h2c: `http2 = true`), "
        "sharing a connection among up to 100 streams",
    )
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="leave every process on every core")
    p.add_argument(
        "--idle-poll",
        action="store_true",
        help="hold /dev/cpu_dma_latency at 0 for the run, so idle cores poll instead of "
        "halting (as cyclictest does; needs root); the result records which held",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="record the server with py-spy during each level (collapsed stacks in DIR)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 1 when any stream failed or any measured target missed."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop  # no global policy change (tests call main)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    with (
        tempfile.TemporaryDirectory(prefix="streamchat-bench-") as tmp,
        procs.idle_poll(args.idle_poll) as idle,
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        bench = Bench(args, tmp)
        res = runner.run(bench.run())
    res.update(
        started=started,
        command=shlex.join(["python", "-m", "bench.run", *argv]),
        machine={
            "nproc": os.cpu_count(),
            "cpu": procs.cpu_model(),
            "python": platform.python_version(),
            "server_cpu": None if args.no_pin else args.server_cpu,
            "client_cpu": None if args.no_pin else args.client_cpu,
            "fd_limit": bench.fd_limit,
            "cores": bench.cores,
            "idle": idle,
        },
        provider_http="HTTP/2 (h2c)" if args.http2 else "HTTP/1.1",
    )
    res["headline"] = headline(res)
    res["targets"] = {
        k: {
            "goal": rule,
            "value": res["headline"].get(k),
            "holds": _holds(res["headline"].get(k), rule),
        }
        for k, rule in TARGETS.items()
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.json"), "w") as fh:
        json.dump(res, fh, indent=2)
    md = markdown(res)
    with open(os.path.join(args.out, "bench.md"), "w") as fh:
        fh.write(md)
    print(md)
    failed = any(t["holds"] is False for t in res["targets"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
