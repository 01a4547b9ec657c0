"""Issue 6: /metrics (Prometheus), per-answer metrics, request ids and JSON logs."""

from __future__ import annotations

import asyncio
import io
import json
import resource
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.keys import SERVICE
from app.settings import AuthSettings, MetricsSettings, SettingsError
from app.settings_load import load_settings
from providers.errors import ProviderError
from tests.fakes import ScriptedProvider, fallback_settings, words
from tests.helpers import captured_logs, iter_events, new_conversation, read_events, text_of

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: TestClient[Any, Any], **headers: str) -> Samples:
    """GET /metrics and parse it with prometheus_client's own parser."""
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    out: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent, as Prometheus would treat a missing series)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


FAKE = {"provider": "fake", "model": "fake-1"}


async def test_a_finished_run_shows_in_every_metric(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client = await aiohttp_client(make_app(streaming={"flush_interval": 0.02}))
    fake.enqueue(words("one two three four five six", delay=0.02))
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    events = await read_events(resp)
    chunks = sum(e["type"] == "chunk" for e in events)
    assert chunks == 6
    m = await scrape(client)
    assert value(m, "streamchat_runs_started_total", **FAKE) == 1
    assert value(m, "streamchat_runs_finished_total", status="complete", **FAKE) == 1
    assert value(m, "streamchat_tokens_streamed_total", **FAKE) == chunks
    assert value(m, "streamchat_ttft_seconds_count", **FAKE) == 1
    ttft = value(m, "streamchat_ttft_seconds_sum", **FAKE)
    assert 0 < ttft < 1
    # one gap between each pair of consecutive deltas, each about the script's 20 ms
    assert value(m, "streamchat_inter_token_seconds_count", **FAKE) == chunks - 1
    assert value(m, "streamchat_inter_token_seconds_bucket", le="0.01", **FAKE) == 0
    assert value(m, "streamchat_inter_token_seconds_bucket", le="+Inf", **FAKE) == chunks - 1
    itl_sum = value(m, "streamchat_inter_token_seconds_sum", **FAKE)
    assert 0.02 * (chunks - 1) <= itl_sum < 1
    assert value(m, "streamchat_live_runs") == 0
    assert value(m, "streamchat_subscribers", transport="sse") == 0
    # the run lasted ~120 ms with a 20 ms flush interval: the flusher wrote, and was timed
    assert value(m, "streamchat_db_flush_seconds_count") >= 1
    assert value(m, "streamchat_db_flush_failures_total") == 0


async def test_failed_runs_are_counted_by_error_code(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client = await aiohttp_client(make_app())  # errors after a token: never retried
    cid = await new_conversation(client)
    errors = [
        ProviderError("rate_limited", "Slow down.", retry_after=1.0),
        ProviderError("rate_limited", "Slow down.", retry_after=1.0),
        ProviderError("upstream_unavailable", "reset"),
    ]
    for err in errors:
        fake.enqueue([("text", "half "), ("error", err)])
        resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
        assert (await read_events(resp))[-1]["code"] == err.code
    fake.enqueue(words("fine"))
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    assert (await read_events(resp))[-1]["type"] == "end"
    m = await scrape(client)
    assert value(m, "streamchat_run_errors_total", code="rate_limited", **FAKE) == 2
    assert value(m, "streamchat_run_errors_total", code="upstream_unavailable", **FAKE) == 1
    errored = sum(v for (name, _), v in m.items() if name == "streamchat_run_errors_total")
    assert errored == 3  # the complete run is not an error
    assert value(m, "streamchat_runs_finished_total", status="failed", **FAKE) == 3
    assert value(m, "streamchat_runs_finished_total", status="complete", **FAKE) == 1


async def test_every_failed_provider_request_is_counted_with_what_followed(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    backup = ScriptedProvider("backup", models=("b-1",))
    client = await aiohttp_client(
        make_app(providers={"backup": backup}, provider_settings=fallback_settings(retries=1))
    )
    cid = await new_conversation(client)
    slow_down = ProviderError("rate_limited", "Slow down.", retry_after=0.01)
    fake.enqueue([("error", slow_down)])  # retried, then answers
    fake.enqueue(words("fine"))
    fake.enqueue([("error", ProviderError("auth", "Bad key."))])  # not retried: backup answers
    backup.enqueue(words("from backup"))
    fake.enqueue([("text", "half "), ("error", ProviderError("upstream_unavailable", "reset"))])
    ends = []
    for _ in range(3):
        resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
        ends.append((await read_events(resp))[-1])
    assert [e["type"] for e in ends] == ["end", "end", "error"]
    m = await scrape(client)
    failures = {
        tuple(sorted(labels)): v
        for (name, labels), v in m.items()
        if name == "streamchat_upstream_failures_total"
    }
    assert failures == {
        (("code", "rate_limited"), ("provider", "fake"), ("then", "retry")): 1,
        (("code", "auth"), ("provider", "fake"), ("then", "fallback")): 1,
        (("code", "upstream_unavailable"), ("provider", "fake"), ("then", "fail")): 1,
    }
    # only the last run failed in the end
    assert value(m, "streamchat_run_errors_total", code="upstream_unavailable", **FAKE) == 1
    assert value(m, "streamchat_run_errors_total", code="auth", **FAKE) == 0


async def test_models_the_provider_does_not_list_share_one_label(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    # clients may name any model; /metrics must not grow a series per name they invent
    client = await aiohttp_client(make_app())
    cid = await new_conversation(client)
    models = ["fake-2", *(f"made-up-{i}" for i in range(8))]  # within the burst limit
    for model in models:
        fake.enqueue(words("a b", delay=0.001))
        resp = await client.post(
            f"/api/v1/conversations/{cid}/stream", json={"content": "q", "model": model}
        )
        assert (await read_events(resp))[-1]["type"] == "end"
    assert [c.model for c in fake.calls] == models  # the provider was asked for each
    m = await scrape(client)
    listed = {"provider": "fake", "model": "fake-2"}
    other = {"provider": "fake", "model": "other"}
    assert value(m, "streamchat_runs_started_total", **listed) == 1
    assert value(m, "streamchat_runs_started_total", **other) == 8
    assert value(m, "streamchat_runs_finished_total", status="complete", **other) == 8
    assert value(m, "streamchat_ttft_seconds_count", **other) == 8
    assert value(m, "streamchat_inter_token_seconds_count", **other) == 8
    assert value(m, "streamchat_tokens_streamed_total", **other) == 16
    labelled = {dict(labels).get("model") for _, labels in m}
    assert not any(str(v).startswith("made-up") for v in labelled)


async def test_process_metrics_show_the_open_file_limit(aiohttp_client: Any, make_app: Any) -> None:
    client = await aiohttp_client(make_app())
    m = await scrape(client)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert value(m, "process_max_fds") == soft
    assert 3 <= value(m, "process_open_fds") < soft
    assert value(m, "process_resident_memory_bytes") > 10 * 2**20
    assert value(m, "process_cpu_seconds_total") > 0


async def test_live_runs_and_subscribers_by_transport(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client = await aiohttp_client(make_app())
    fake.enqueue([("text", "a"), ("hang",)])
    cid = await new_conversation(client)
    sse = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    events = iter_events(sse)
    start = await anext(events)
    assert (await anext(events))["type"] == "chunk"
    ws = await client.ws_connect("/ws")
    await ws.send_json({"op": "resume", "message_id": start["message_id"], "after": 0})
    assert (await ws.receive_json(timeout=5))["type"] == "start"
    m = await scrape(client)
    assert value(m, "streamchat_live_runs") == 1
    assert value(m, "streamchat_subscribers", transport="sse") == 1
    assert value(m, "streamchat_subscribers", transport="ws") == 1
    assert value(m, "streamchat_resumes_total", transport="ws") == 1
    assert value(m, "streamchat_tokens_streamed_total", **FAKE) == 1  # counted while live
    await ws.close()
    sse.close()
    run = client.app[SERVICE].get_run(start["message_id"])
    assert run is not None
    await client.app[SERVICE].cancel(run)
    m = await scrape(client)
    assert value(m, "streamchat_live_runs") == 0
    assert value(m, "streamchat_runs_finished_total", status="cancelled", **FAKE) == 1
    assert value(m, "streamchat_tokens_streamed_total", **FAKE) == 1  # not counted twice


async def test_cancel_to_upstream_abort_is_measured(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client = await aiohttp_client(make_app())
    fake.enqueue([("text", "a"), ("hang",)])
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    events = iter_events(resp)
    mid = (await anext(events))["message_id"]
    await anext(events)
    cancel = await client.post(f"/api/v1/conversations/{cid}/messages/{mid}/cancel")
    assert cancel.status == 200
    assert fake.calls[-1].closed_early  # the provider stream really was closed
    m = await scrape(client)
    assert value(m, "streamchat_cancel_abort_seconds_count") == 1
    assert 0 <= value(m, "streamchat_cancel_abort_seconds_sum") < 0.5
    # resuming the cancelled answer over SSE counts as a resume
    again = await client.get(f"/api/v1/conversations/{cid}/messages/{mid}/stream?after=1")
    assert (await read_events(again))[-1]["status"] == "cancelled"
    m = await scrape(client)
    assert value(m, "streamchat_resumes_total", transport="sse") == 1


async def test_per_answer_metrics_are_stored_and_returned(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    client = await aiohttp_client(make_app())
    fake.enqueue(words("a b c d", delay=0.01))
    cid = await new_conversation(client)
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    events = await read_events(resp)
    end = events[-1]["metrics"]
    conv = await (await client.get(f"/api/v1/conversations/{cid}")).json()
    stored = conv["messages"][-1]["metrics"]
    assert stored == pytest.approx(end)
    assert 0 < stored["ttft_ms"] < stored["duration_ms"]
    assert stored["tokens_per_s"] > 0


async def test_metrics_can_be_turned_off(aiohttp_client: Any, make_app: Any) -> None:
    client = await aiohttp_client(make_app(metrics=MetricsSettings(enabled=False)))
    resp = await client.get("/metrics")
    assert resp.status == 404


async def test_metrics_token_is_required_when_set(
    aiohttp_client: Any, make_app: Any, tmp_path: Any
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[metrics]\ntoken_env = "SC_METRICS_TOKEN"\n')
    settings = load_settings(cli={"config": str(cfg)}, env={"SC_METRICS_TOKEN": "s3cret-token"})
    assert "s3cret" not in repr(settings)
    client = await aiohttp_client(make_app(metrics=settings.metrics))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
        resp = await client.get("/metrics", headers=headers)
        assert resp.status == 401, headers
        assert (await resp.json())["error"]["code"] == "auth"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    await scrape(client, Authorization="Bearer s3cret-token")


async def test_metrics_follow_api_key_auth_without_a_token(
    aiohttp_client: Any, make_app: Any
) -> None:
    client = await aiohttp_client(make_app(auth=AuthSettings(mode="api_key")))
    resp = await client.get("/metrics")
    assert resp.status == 401


def test_metrics_settings_fail_closed(tmp_path: Any) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[metrics]\ntoken_env = "SC_METRICS_TOKEN"\n')
    with pytest.raises(SettingsError, match="SC_METRICS_TOKEN"):
        load_settings(cli={"config": str(cfg)}, env={})
    cfg.write_text('[metrics]\ntoken = "inline"\n')
    with pytest.raises(SettingsError, match="token_env"):
        load_settings(cli={"config": str(cfg)}, env={})
    cfg.write_text('log_format = "xml"\n')
    with pytest.raises(SettingsError, match="log_format"):
        load_settings(cli={"config": str(cfg)}, env={})
    s = load_settings(env={"STREAMCHAT_LOG_FORMAT": "json"})
    assert s.log_format == "json" and s.metrics.enabled


async def test_each_app_has_its_own_registry(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider
) -> None:
    one = await aiohttp_client(make_app())
    two = await aiohttp_client(make_app())
    cid = await new_conversation(one)
    await read_events(await one.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"}))
    assert value(await scrape(one), "streamchat_runs_started_total", **FAKE) == 1
    assert value(await scrape(two), "streamchat_runs_started_total", **FAKE) == 0


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The root logger's lines as JSON, in a buffer."""
    yield from captured_logs("json")


@pytest.fixture
def text_logs() -> Iterator[io.StringIO]:
    """The root logger's lines as text, in a buffer."""
    yield from captured_logs("text")


async def test_a_client_chosen_value_cannot_forge_a_text_log_line(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider, text_logs: io.StringIO
) -> None:
    client = await aiohttp_client(make_app())
    cid = await new_conversation(client)
    model = "m\n2026-01-01 00:00:00,000 INFO app.runner [-]: run end forged\r\u2028x"
    resp = await client.post(
        f"/api/v1/conversations/{cid}/stream", json={"content": "q", "model": model}
    )
    assert (await read_events(resp))[-1]["type"] == "end"
    await asyncio.sleep(0)
    lines = text_logs.getvalue().splitlines()
    runs = [ln for ln in lines if "run start" in ln or "run end" in ln]
    assert len(runs) == 2, lines  # one line each, nothing forged
    assert all(ln.split(" ")[2] == "INFO" for ln in lines), lines
    assert "model=m\\x0a2026-01-01" in runs[0] and "\\x0d\\u2028x" in runs[0]
    assert "forged" not in "".join(ln for ln in lines if ln not in runs)


async def test_request_ids_on_every_log_line_of_a_request(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider, json_logs: io.StringIO
) -> None:
    client = await aiohttp_client(make_app())
    cid = await new_conversation(client)
    resp = await client.post(
        f"/api/v1/conversations/{cid}/stream",
        json={"content": "hello"},
        headers={"X-Request-ID": "trace-42.a"},
    )
    assert resp.headers["X-Request-ID"] == "trace-42.a"
    assert text_of(await read_events(resp)) == "You said: hello"
    await asyncio.sleep(0)
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    runs = [ln for ln in lines if ln["message"].startswith(("run start", "run end"))]
    assert len(runs) == 2, lines
    # the run task inherited the id of the request that started it, to its end
    assert all(ln["request_id"] == "trace-42.a" for ln in runs)
    assert {"ts", "level", "logger", "message"} <= set(runs[0])
    end = runs[1]["message"]
    for part in ("provider=fake", "model=fake-1", "status=complete", "ttft_ms=", "tokens=3"):
        assert part in end
    assert "hello" not in json_logs.getvalue()  # prompts are not logged at INFO
    # an id that is not tame is replaced; requests without one get a fresh one each
    odd = await client.get("/api/v1/healthz", headers={"X-Request-ID": "bad id\u00e9"})
    fresh = await client.get("/api/v1/healthz")
    ids = {odd.headers["X-Request-ID"], fresh.headers["X-Request-ID"]}
    assert len(ids) == 2 and all(len(i) == 16 for i in ids)
