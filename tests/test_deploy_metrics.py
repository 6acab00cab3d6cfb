"""Every metric and label the Grafana dashboard and the alerts use is one the real server exports.

The real app runs under uvicorn on loopback, serves an upload, a rejected upload and a predict request, and
is scraped; each PromQL expression of deploy/ is parsed (promql-parser) and every selector in it must name
a sample of that scrape, with labels the sample has or Prometheus adds when it scrapes a pod.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml
from deploy_files import ROOT
from prometheus_client.parser import text_string_to_metric_families
from server_harness import serving, task_artifact

from recast_core.bank import TemplateBank
from server.settings import Settings

KEY = "metrics-test-key"
# labels the Prometheus Operator puts on every scraped series of a pod behind a ServiceMonitor
TARGET_LABELS = {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}
# series Prometheus itself makes for each target
SYNTHETIC = {"up": set[str]()}
# Grafana's built-in variables outside label values, replaced by what Grafana puts there
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


class Scrape:
    def __init__(self, text: str) -> None:
        self.labels: dict[str, set[str]] = dict(SYNTHETIC)
        self.values: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)
                for label, value in sample.labels.items():
                    self.values.setdefault(label, set()).add(value)


@pytest.fixture(scope="module")
def scrape(bank_dir: Path, default_bank: TemplateBank, tmp_path_factory: pytest.TempPathFactory) -> Scrape:
    settings = Settings(
        bank=bank_dir, store=str(tmp_path_factory.mktemp("tasks")), api_keys=KEY, threads=2, max_wait_ms=2.0
    )
    admin = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/octet-stream"}
    with serving(settings) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/healthz").status_code == 200 and http.get("/readyz").status_code == 200
        assert _healthcheck(url) == 0  # the images' HEALTHCHECK script against the real server
        good = task_artifact(default_bank, 7).to_bytes()
        assert http.put("/v1/tasks/metrics-task", content=good, headers=admin).status_code == 201
        alien = replace(task_artifact(default_bank, 8), bank_fingerprint="0" * 64)  # another bank's task
        rejected = http.put("/v1/tasks/alien", content=alien.to_bytes(), headers=admin)
        assert rejected.status_code == 422 and rejected.json()["reason"] == "fingerprint_mismatch"
        answer = http.post("/v1/tasks/metrics-task/predict", json={"inputs": ["a text", "another text"]})
        assert answer.status_code == 200
        return Scrape(http.get("/metrics").text)


def _healthcheck(url: str) -> int:
    spec = importlib.util.spec_from_file_location("healthcheck", ROOT / "docker" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    port = int(url.rsplit(":", 1)[1])
    return 0 if module.ready(port) else 1


def _expressions() -> dict[str, str]:
    """Every PromQL expression in deploy/: dashboard panel targets and alert rules, by where they are."""
    found: dict[str, str] = {}
    dashboard = json.loads((ROOT / "deploy" / "base" / "dashboards" / "recast-serve.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            found[f"dashboard {panel['title']!r} {target['refId']}"] = target["expr"]
    rules = yaml.safe_load((ROOT / "deploy" / "base" / "prometheusrule.yaml").read_text())
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            found[f"alert {rule['alert']}"] = rule["expr"]
    return found


EXPRESSIONS = _expressions()


def _selectors(expr: str) -> tuple[list[tuple[str, list[tuple[str, str, str]]]], set[str]]:
    """(metric name, [(label, op, value)]) of every selector, and the labels of by/without/on/ignoring."""
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    selectors: list[tuple[str, list[tuple[str, str, str]]]] = []
    grouping: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = [(m.name, str(m.op), m.value) for m in node.matchers.matchers]
            selectors.append((node.name or "", matchers))  # "": a selector by labels alone
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                grouping.update(node.modifier.matching.labels)
            grouping.update(node.modifier.group_labels or [])

    promql_parser.walk(promql_parser.parse(expr), visit)
    return selectors, grouping


def test_deploy_uses_promql_expressions() -> None:
    assert sum(k.startswith("dashboard") for k in EXPRESSIONS) >= 10
    assert sum(k.startswith("alert") for k in EXPRESSIONS) >= 6


@pytest.mark.parametrize("where", sorted(EXPRESSIONS))
def test_expression_uses_exported_metrics_and_labels(scrape: Scrape, where: str) -> None:
    selectors, grouping = _selectors(EXPRESSIONS[where])
    assert selectors, f"{where}: no metric"
    known_labels = set(TARGET_LABELS)
    for name, matchers in selectors:
        assert name in scrape.labels, f"{where}: the server exports no {name!r}"
        assert name.startswith("recast_") or name in SYNTHETIC
        labels = scrape.labels[name] | TARGET_LABELS
        known_labels |= labels
        for label, op, value in matchers:
            assert label in labels, f"{where}: {name} has no label {label!r} (it has {sorted(labels)})"
            if label == "endpoint" and name.startswith("recast_"):  # route templates the server reports
                values = value.split("|") if "Re" in op else [value]
                unknown = set(values) - scrape.values["endpoint"] - {"/healthz", "/readyz", "/metrics"}
                assert not unknown, f"{where}: no endpoint {unknown}"
    assert grouping <= known_labels, f"{where}: grouping by unknown labels {grouping - known_labels}"


def test_dashboard_namespace_variable_uses_an_exported_metric(scrape: Scrape) -> None:
    dashboard = json.loads((ROOT / "deploy" / "base" / "dashboards" / "recast-serve.json").read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "namespace"]
    assert variable["definition"] == "label_values(recast_tasks_resident, namespace)"
    assert "recast_tasks_resident" in scrape.labels and "namespace" in TARGET_LABELS
