"""The shipped Grafana dashboard, Prometheus alerts and scrape job match the real /metrics.

A server with the fake provider runs every kind of run (complete, failed, cancelled,
resumed) and is scraped the way `deploy/prometheus/prometheus.yml` says. Every PromQL
expression of the dashboard and the alerts is parsed (promql-parser, the Prometheus
grammar) and checked against that scrape: the metrics exist, the labels they match,
group by, print and join on exist where they are used, `rate` only reads counters, and
`histogram_quantile` reads buckets that keep `le`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser as pql
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.settings_load import load_settings
from providers.errors import ProviderError
from tests.fakes import ScriptedProvider, words
from tests.helpers import iter_events, new_conversation, read_events

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "streamchat.json"
ALERTS = DEPLOY / "prometheus" / "streamchat-alerts.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"
TARGET = frozenset({"job", "instance"})  # labels Prometheus adds to every scraped series
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
RANGE_FUNCS = {"rate", "irate", "increase"}


class Scrape:
    """Sample names of one scrape, with their labels and their family's type."""

    def __init__(self, text: str) -> None:
        self.labels: dict[str, set[str]] = {"up": set()}  # `up` is Prometheus's own
        self.kind: dict[str, str] = {"up": "gauge"}
        self.families: set[str] = set()
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for s in family.samples:
                self.labels.setdefault(s.name, set()).update(s.labels)
                self.kind[s.name] = family.type

    def series_labels(self, name: str) -> set[str]:
        """The labels a stored series of this name has."""
        assert name in self.labels, f"{name} is not in /metrics"
        return self.labels[name] | TARGET


def selectors(node: Any) -> Iterator[Any]:
    """Every vector selector under a node."""
    found: list[Any] = []
    pql.walk(node, lambda n: found.append(n) if isinstance(n, pql.VectorSelector) else None)
    return iter(found)


def out_labels(node: Any, scrape: Scrape) -> set[str] | None:
    """The labels of the series an expression returns (None for a scalar), checking it."""
    if isinstance(node, (pql.NumberLiteral, pql.StringLiteral)):
        return None
    if isinstance(node, (pql.ParenExpr, pql.UnaryExpr)):
        return out_labels(node.expr, scrape)
    if isinstance(node, pql.MatrixSelector):
        return out_labels(node.vector_selector, scrape)
    if isinstance(node, pql.VectorSelector):
        have = scrape.series_labels(node.name)
        for m in node.matchers.matchers:
            assert m.name in have, f"{node.name} has no label {m.name}"
        return have
    if isinstance(node, pql.AggregateExpr):
        inner = out_labels(node.expr, scrape) or set()
        if node.modifier is None:
            return set()
        named = set(node.modifier.labels)
        assert named <= inner, f"grouping by {named - inner}, which the series lack"
        return named if node.modifier.type == pql.AggModifierType.By else inner - named
    if isinstance(node, pql.Call):
        name = node.func.name
        scalars = (pql.NumberLiteral, pql.StringLiteral)
        vectors = [a for a in node.args if not isinstance(a, scalars)]
        if name in RANGE_FUNCS:
            for sel in selectors(node):
                scrape.series_labels(sel.name)  # it exists
                kind = scrape.kind[sel.name]
                assert kind in ("counter", "histogram"), f"{name}() of the {kind} {sel.name}"
        if name == "histogram_quantile":
            inner = out_labels(vectors[0], scrape) or set()
            assert "le" in inner, "histogram_quantile over series without `le`"
            assert all(s.name.endswith("_bucket") for s in selectors(vectors[0]))
            return inner - {"le"}
        if name == "vector":
            return set()
        return out_labels(vectors[0], scrape) if vectors else None
    if isinstance(node, pql.BinaryExpr):
        lhs, rhs = out_labels(node.lhs, scrape), out_labels(node.rhs, scrape)
        if lhs is None or rhs is None:
            return rhs if lhs is None else lhs
        matching = node.modifier.matching if node.modifier else None
        if matching is None:
            # one-to-one on every label: both sides must carry the same ones
            assert lhs == rhs, f"{lhs} and {rhs} never match"
            return lhs
        on = set(matching.labels)
        assert on <= lhs and on <= rhs, f"joined on {on}, not on both sides"
        return lhs
    raise AssertionError(f"unexpected PromQL node {type(node).__name__}")


def check_expr(expr: str, scrape: Scrape) -> set[str]:
    """Parse one expression as Prometheus would and return its output labels."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    labels = out_labels(pql.parse(expr), scrape)
    return labels or set()


def used_names(expr: str) -> set[str]:
    """The metric names an expression selects."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return {s.name for s in selectors(pql.parse(expr))}


async def exercised_scrape(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider, tmp_path: Path
) -> Scrape:
    """Run every kind of run on a real app, then scrape it as prometheus.yml says."""
    job = yaml.safe_load(SCRAPE.read_text())["scrape_configs"][0]
    cfg = tmp_path / "c.toml"
    cfg.write_text('[metrics]\ntoken_env = "SC_METRICS_TOKEN"\n')
    settings = load_settings(cli={"config": str(cfg)}, env={"SC_METRICS_TOKEN": "t0ken"})
    client = await aiohttp_client(
        make_app(metrics=settings.metrics, streaming={"flush_interval": 0.02})
    )
    cid = await new_conversation(client)
    fake.enqueue(words("one two three four", delay=0.03))  # TTFT, gaps, saves
    fake.enqueue([("text", "half "), ("error", ProviderError("rate_limited", "Slow down."))])
    for _ in range(2):
        resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
        await read_events(resp)
    fake.enqueue([("text", "a"), ("hang",)])
    resp = await client.post(f"/api/v1/conversations/{cid}/stream", json={"content": "q"})
    events = iter_events(resp)
    mid = (await anext(events))["message_id"]
    await anext(events)
    assert (await client.post(f"/api/v1/conversations/{cid}/messages/{mid}/cancel")).status == 200
    again = await client.get(f"/api/v1/conversations/{cid}/messages/{mid}/stream?after=1")
    await read_events(again)
    auth = job["authorization"]
    resp = await client.get(job["metrics_path"], headers={"Authorization": f"{auth['type']} t0ken"})
    assert resp.status == 200, await resp.text()
    scrape = Scrape(await resp.text())
    for name in (
        "streamchat_run_errors_total",
        "streamchat_upstream_failures_total",
        "streamchat_cancel_abort_seconds_bucket",
        "streamchat_resumes_total",
        "streamchat_db_flush_seconds_bucket",
        "streamchat_inter_token_seconds_bucket",
    ):
        assert scrape.labels.get(name) is not None, f"the scenario did not produce {name}"
    return scrape


@pytest.fixture
async def scrape(
    aiohttp_client: Any, make_app: Any, fake: ScriptedProvider, tmp_path: Path
) -> Scrape:
    """One exercised scrape per test."""
    return await exercised_scrape(aiohttp_client, make_app, fake, tmp_path)


def dashboard_panels() -> list[dict[str, Any]]:
    """The dashboard's panels, rows included."""
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return panels


async def test_every_dashboard_query_reads_metrics_that_exist(scrape: Scrape) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    shown: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            labels = check_expr(target["expr"], scrape)
            shown |= used_names(target["expr"])
            for name in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert name in labels, f"{panel['title']}: legend {{{{{name}}}}} not in {labels}"
    # every streamchat metric is on the dashboard, and the process figures it relies on
    for family in scrape.families:
        if family.startswith("streamchat_") and not family.endswith("_created"):
            assert any(n.startswith(family) for n in shown), f"{family} is on no panel"
    assert {
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    } <= shown
    # the template variables' label_values() queries
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
        assert found, var["query"]
        selector, label = found.groups()
        assert label in check_expr(selector, scrape), f"${var['name']}: no label {label}"


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    text = DASHBOARD.read_text()
    used = set(re.findall(r"\$\{?(\w+)", text)) - {"__rate_interval", "__all"}
    assert used == defined, f"undefined {used - defined}, unused {defined - used}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    boxes: list[tuple[int, int, int, int, str]] = []
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x, y, w, h, other in boxes:
            beside = g["x"] >= x + w or x >= g["x"] + g["w"]
            apart = beside or g["y"] >= y + h or y >= g["y"] + g["h"]
            assert apart, f"{panel['title']} overlaps {other}"
        boxes.append((g["x"], g["y"], g["w"], g["h"], panel["title"]))
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert panel.get("description"), f"{panel['title']} says nothing about what it shows"


async def test_every_alert_reads_metrics_that_exist(scrape: Scrape) -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    job = yaml.safe_load(SCRAPE.read_text())["scrape_configs"][0]["job_name"]
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        labels = check_expr(rule["expr"], scrape)
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        text = rule["annotations"]["summary"] + rule["annotations"]["description"]
        for name in re.findall(r"\$labels\.(\w+)", text):
            assert name in labels, f"{rule['alert']}: $labels.{name} not in {labels}"
        # each rule watches the job the shipped scrape config defines
        for sel in selectors(pql.parse(rule["expr"])):
            jobs = [m.value for m in sel.matchers.matchers if m.name == "job"]
            assert jobs == [job], f"{rule['alert']}: {sel.name} is not limited to job {job}"


def test_the_scrape_config_loads_the_alerts_beside_it() -> None:
    config = yaml.safe_load(SCRAPE.read_text())
    for name in config["rule_files"]:
        assert (SCRAPE.parent / name).is_file(), name
    (job,) = config["scrape_configs"]
    assert job["authorization"]["type"] == "Bearer"  # what metrics.token_env expects
