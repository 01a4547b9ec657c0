"""Prometheus metrics: one registry per app, cheap hooks for the service, and /metrics.

Gauges (live runs, subscribers) and the token counter are read from the runs at
scrape time, so the streaming path pays nothing for them. The only per-token hook is
the inter-token histogram, a bisect and an increment (no lock: one event loop).
"""

from __future__ import annotations

import hmac
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from app.errors import ApiError
from app.settings import Settings

if TYPE_CHECKING:
    from app.runs import Run

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CANCEL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
FLUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
TRANSPORTS = ("sse", "ws", "http")
# The `model` label of a model the provider's settings do not list: clients may name any
# model, and a label per name would let them grow /metrics (and Prometheus) without bound.
OTHER_MODEL = "other"


class FastHistogram:
    """Bucket counts for the per-token path, exposed as a Prometheus histogram."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (bucket `le` holds values <= its bound)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, ending with +Inf."""
        out, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class Metrics:
    """Every streamchat metric, registered in the app's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runs_started = Counter(
            "streamchat_runs_started", "Runs started.", ["provider", "model"], registry=r
        )
        self.runs_finished = Counter(
            "streamchat_runs_finished",
            "Runs ended, by final status (complete, cancelled, failed, interrupted).",
            ["provider", "model", "status"],
            registry=r,
        )
        self.run_errors = Counter(
            "streamchat_run_errors",
            "Runs that ended with an error, by the error code the client got "
            "(rate_limited, timeout, upstream_unavailable, overloaded, ...).",
            ["provider", "model", "code"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "streamchat_upstream_failures",
            "Failed provider requests (every attempt, retried or not), by error code and what "
            "the run did next: retry, fallback (to the next provider) or fail.",
            ["provider", "code", "then"],
            registry=r,
        )
        self.ttft = Histogram(
            "streamchat_ttft_seconds",
            "From the run's start to its first token.",
            ["provider", "model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.cancel_abort = Histogram(
            "streamchat_cancel_abort_seconds",
            "From a cancel (or the last subscriber leaving, with on_disconnect=cancel) to the "
            "upstream request being closed.",
            buckets=CANCEL_BUCKETS,
            registry=r,
        )
        self.resumes = Counter(
            "streamchat_resumes",
            "Resume requests (SSE Last-Event-ID or ?after=, WebSocket resume op).",
            ["transport"],
            registry=r,
        )
        self.flush_seconds = Histogram(
            "streamchat_db_flush_seconds",
            "One batched write of every live answer's text.",
            buckets=FLUSH_BUCKETS,
            registry=r,
        )
        self.flush_failures = Counter(
            "streamchat_db_flush_failures",
            "Batched writes that failed (and are retried).",
            registry=r,
        )
        self.itl: dict[tuple[str, str], FastHistogram] = {}
        self.tokens_done: dict[tuple[str, str], int] = {}  # text deltas of ended runs
        self._cancelled_at: dict[str, float] = {}
        self._runs: Mapping[str, Run] = {}
        self._models: Mapping[str, Collection[str]] = {}
        r.register(_LiveCollector(self))
        # process_* (CPU, RSS, open and maximum file descriptors: each open stream holds
        # one or two), read from /proc at scrape time; nothing on Linux-less hosts
        ProcessCollector(registry=r)

    def watch(
        self, runs: Mapping[str, Run], models: Mapping[str, Collection[str]] | None = None
    ) -> None:
        """Read live runs from this mapping (the service's, by message id) at scrape time.

        `models`: each provider's listed models, the only ones that get their own `model`
        label; any other model a client names is counted as OTHER_MODEL.
        """
        self._runs = runs
        if models is not None:
            self._models = models

    def model_label(self, provider: str, model: str) -> str:
        """The `model` label for a run: the model if its provider lists it."""
        listed = self._models.get(provider)
        return model if listed is None or model in listed else OTHER_MODEL

    # -- hooks the service calls -------------------------------------------------------

    def run_started(self, run: Run) -> None:
        """A run was launched."""
        self.runs_started.labels(run.provider, self.model_label(run.provider, run.model)).inc()

    def gap_observer(self, provider: str, model: str) -> Callable[[float], None]:
        """The per-token callback for a run: observes the seconds since the previous token."""
        key = (provider, self.model_label(provider, model))
        hist = self.itl.get(key)
        if hist is None:
            hist = self.itl[key] = FastHistogram(ITL_BUCKETS)
        return hist.observe

    def upstream_failed(self, provider: str, code: str, then: str) -> None:
        """One provider request failed; `then` is retry, fallback or fail."""
        self.upstream_failures.labels(provider, code, then).inc()

    def cancel_requested(self, message_id: str) -> None:
        """A cancel was asked for; the clock for cancel_abort starts (first request wins)."""
        self._cancelled_at.setdefault(message_id, time.monotonic())

    def upstream_closed(self, message_id: str) -> None:
        """The cancelled run's upstream request is closed."""
        t0 = self._cancelled_at.pop(message_id, None)
        if t0 is not None:
            self.cancel_abort.observe(time.monotonic() - t0)

    def run_finished(
        self, run: Run, status: str, ttft_ms: float | None, error_code: str | None = None
    ) -> None:
        """A run ended with its final status (and the error's code, if it ended with one)."""
        self._cancelled_at.pop(run.message_id, None)
        key = (run.provider, self.model_label(run.provider, run.model))
        self.runs_finished.labels(*key, status).inc()
        if error_code is not None:
            self.run_errors.labels(*key, error_code).inc()
        if ttft_ms is not None:
            self.ttft.labels(*key).observe(ttft_ms / 1000)
        self.tokens_done[key] = self.tokens_done.get(key, 0) + run.text_events


class _LiveCollector:
    """Scrape-time metrics: live runs, subscribers, tokens streamed, inter-token latency."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        """Build the families from the runs as they are right now."""
        m = self.metrics
        live = 0
        subscribers = dict.fromkeys(TRANSPORTS, 0)
        tokens = dict(m.tokens_done)
        for run in list(m._runs.values()):
            for transport, count in run.subscribers.items():
                subscribers[transport] = subscribers.get(transport, 0) + count
            if run.final_status == "streaming":  # not yet counted in tokens_done
                live += 1
                key = (run.provider, m.model_label(run.provider, run.model))
                tokens[key] = tokens.get(key, 0) + run.text_events
        yield GaugeMetricFamily("streamchat_live_runs", "Runs generating right now.", value=live)
        subs = GaugeMetricFamily(
            "streamchat_subscribers", "Clients following a run, by transport.", labels=["transport"]
        )
        for transport, count in sorted(subscribers.items()):
            subs.add_metric([transport], count)
        yield subs
        tok = CounterMetricFamily(
            "streamchat_tokens_streamed",
            "Text deltas relayed to clients (one per upstream token for most providers).",
            labels=["provider", "model"],
        )
        for (provider, model), count in sorted(tokens.items()):
            tok.add_metric([provider, model], count)
        yield tok
        itl = HistogramMetricFamily(
            "streamchat_inter_token_seconds",
            "Time between consecutive text deltas of a run, as received from the upstream.",
            labels=["provider", "model"],
        )
        for (provider, model), hist in sorted(m.itl.items()):
            itl.add_metric([provider, model], hist.buckets(), hist.sum)
        yield itl

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: the families depend on the runs (and names cannot clash)."""
        return []


def metrics_handler(
    metrics: Metrics, settings: Settings
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The /metrics view: Prometheus text, behind the metrics token or the server's auth."""
    from app.auth import authenticate  # here: app.auth -> app.keys -> app.service -> us

    token = settings.metrics.token.get().encode() if settings.metrics.token else None

    async def handler(request: web.Request) -> web.StreamResponse:
        if token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token):
                raise ApiError(
                    401,
                    "auth",
                    "Send 'Authorization: Bearer <metrics token>'.",
                    headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
        elif settings.auth.mode != "none":
            await authenticate(request)  # no metrics token: any valid API key may read
        # Prometheus text, or OpenMetrics when the scraper's Accept asks for it
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(metrics.registry), headers={"Content-Type": content_type})

    return handler
