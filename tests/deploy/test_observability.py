"""The Prometheus config and rules and the Grafana provisioning and dashboard, checked against the real service.

Dashboards and alerts fail silently: a renamed metric or label value just draws an empty panel or never fires.
So every metric name and every route/engine/tier/result value in their PromQL must appear in the /metrics of the
real app (lifespan, ONNX Runtime on the demo model) after a /classify and an /embed. With `promtool` on PATH
(Debian package `prometheus`), the config, the rules and the dashboard's expressions are also parsed by Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.tools import require
from tests.service.conftest import b64, running_app, shape_png

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "clipserve.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "clipserve.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "clipserve.yml"

CHECKED_LABELS = ("tier", "result", "engine", "route")
LABELS = ["blue triangle", "red circle"]

# Quoted strings are removed before looking for metric names: label values and legends are not series.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
# An identifier not preceded by a word character, `:` or `$` (so `5m`, `$instance`, `$__rate_interval` are skipped).
_IDENTIFIER = re.compile(r"(?<![\w:$])[a-zA-Z_:][\w:]*")
_MATCHER = re.compile(rf'\b({"|".join(CHECKED_LABELS)})\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')

# (what the brief asks for, panel type, fragments the panel's expressions must contain once whitespace is removed)
REQUIRED_PANELS = [
    ("request rate by route and status", "timeseries", ["rate(clipserve_requests_total", "by(route,status)"]),
    (
        "latency p50/p95/p99 per route",
        "timeseries",
        [
            f"histogram_quantile({q},sumby(route,le)(rate(clipserve_request_seconds_bucket"
            for q in ("0.5", "0.95", "0.99")
        ],
    ),
    ("average batch size per engine", "timeseries", ["by(engine)(rate(clipserve_batch_size_sum", "_count"]),
    ("queue depth per engine", "timeseries", ["by(engine)(clipserve_queue_depth"]),
    (
        "label-cache hit ratio per tier",
        "timeseries",
        ['sumby(tier)(rate(clipserve_label_cache_total{instance=~"$instance",result="hit"}', ")/sumby(tier)("],
    ),
    ("Redis errors by operation", "timeseries", ["by(operation)(rate(clipserve_redis_errors_total"]),
    ("engine time", "timeseries", ["clipserve_engine_seconds_bucket"]),
    ("queue wait", "timeseries", ["clipserve_queue_wait_seconds_bucket"]),
    ("preprocessing time", "timeseries", ["clipserve_preprocess_seconds_bucket"]),
    ("rejected items", "timeseries", ["rate(clipserve_rejected_total"]),
    ("engine info", "stat", ["clipserve_engine_info"]),
]


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict]) -> list[dict]:
    """All panels, including those inside collapsed rows."""
    found = []
    for panel in panels:
        found.append(panel)
        found.extend(_panels(panel.get("panels", [])))
    return found


def _rules() -> list[dict]:
    return [rule for group in _yaml(RULES)["groups"] for rule in group["rules"]]


def _expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard target, template variable query and rule."""
    dashboard = _dashboard()
    found = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            found.append((f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query))
    found += [(f"rule {rule.get('record') or rule['alert']}", rule["expr"]) for rule in _rules()]
    return found


def _metric_names(expr: str) -> set[str]:
    """Series the expression selects: clipserve_* names and recorded `level:metric:operation` names."""
    return {
        name for name in _IDENTIFIER.findall(_STRING.sub('""', expr)) if name.startswith("clipserve_") or ":" in name
    }


def _matcher_values(expr: str) -> list[tuple[str, str]]:
    """(label, value) for every matcher on a checked label; each alternative of a regex matcher on its own."""
    found = []
    for label, op, value in _MATCHER.findall(expr):
        if "$" in value:  # a Grafana variable, filled in at query time
            continue
        found += [(label, item) for item in (value.split("|") if "~" in op else [value])]
    return found


def _exported_names(text: str) -> set[str]:
    """Series names Prometheus stores from this exposition, including families that have no sample yet."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
        elif line and not line.startswith("#"):
            names.add(_IDENTIFIER.match(line).group())
    return names


def _emitted_values(text: str) -> dict[str, set[str]]:
    values: dict[str, set[str]] = {label: set() for label in CHECKED_LABELS}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label in CHECKED_LABELS:
                if label in sample.labels:
                    values[label].add(sample.labels[label])
    return values


async def _scrape() -> str:
    async with running_app() as (_, client):
        # /readyz is excluded by name in the error-ratio alert, so it must be a route the service records.
        assert (await client.get("/readyz")).status_code == 200
        png = b64(shape_png())
        body = {"images": [png], "labels": LABELS, "templates": "simple"}
        assert (await client.post("/classify", json=body)).status_code == 200
        # Same labels and templates: the label cache answers from memory, so both hit and miss are emitted.
        body = {"images": [png], "texts": LABELS, "templates": "simple"}
        assert (await client.post("/embed", json=body)).status_code == 200
        response = await client.get("/metrics")
        assert response.status_code == 200
        return response.text


@pytest.fixture(scope="module")
def metrics_text() -> str:
    # One app for the module; a sync fixture with its own loop avoids module-scoped event loops.
    return asyncio.run(_scrape())


def test_prometheus_scrapes_clipserve_and_itself():
    config = _yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    clipserve = jobs["clipserve"]
    assert clipserve["static_configs"] == [{"targets": ["clipserve:8000"]}]
    assert clipserve.get("metrics_path", "/metrics") == "/metrics"
    assert clipserve["scrape_interval"] == "5s"
    assert jobs["prometheus"]["static_configs"] == [{"targets": ["localhost:9090"]}]
    # docker-compose mounts deploy/prometheus/rules at /etc/prometheus/rules.
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]


def test_grafana_provisioning():
    (source,) = _yaml(DATASOURCE)["datasources"]
    assert (source["type"], source["uid"], source["url"], source["isDefault"]) == (
        "prometheus",
        "prometheus",
        "http://prometheus:9090",
        True,
    )
    (provider,) = _yaml(DASHBOARD_PROVIDER)["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_dashboard_has_the_required_panels_on_the_provisioned_datasource():
    dashboard = _dashboard()
    assert dashboard["uid"] == "clipserve" and dashboard["schemaVersion"] >= 36
    panels = [panel for panel in _panels(dashboard["panels"]) if panel["type"] != "row"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["instance"]["datasource"]["uid"] == "prometheus"
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
            # Every query follows the $instance selector, or the variable would silently do nothing.
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
    squeezed = {panel["title"]: "".join("".join(t["expr"] for t in panel["targets"]).split()) for panel in panels}
    kinds = {panel["title"]: panel["type"] for panel in panels}
    for what, kind, fragments in REQUIRED_PANELS:
        matching = [t for t, exprs in squeezed.items() if kinds[t] == kind and all(f in exprs for f in fragments)]
        assert matching, f"no {kind} panel for {what}: expressions containing {fragments}"


def test_every_metric_in_dashboard_and_rules_is_exported(metrics_text):
    exported = _exported_names(metrics_text)
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    assert {"clipserve_requests_total", "clipserve_request_seconds_bucket", "clipserve_engine_info"} <= exported
    for where, expr in _expressions():
        names = _metric_names(expr)
        # `up{job="clipserve"}` (target down) is Prometheus's own series, not the service's.
        assert names or 'up{job="clipserve"}' in expr, f"{where} selects no clipserve series: {expr}"
        for name in names:
            known = recorded if ":" in name else exported
            assert name in known, f"{where} uses {name}, which neither /metrics nor a recording rule provides"


def test_every_label_value_in_dashboard_and_rules_is_emitted(metrics_text):
    emitted = _emitted_values(metrics_text)
    # The requests above must have produced what the service emits on every path the config relies on.
    assert {"/classify", "/embed", "/readyz"} <= emitted["route"]
    assert {"image", "text"} <= emitted["engine"] and {"hit", "miss"} <= emitted["result"]
    used = [(where, label, value) for where, expr in _expressions() for label, value in _matcher_values(expr)]
    assert used, "no route/engine/tier/result matchers found: is the matcher pattern still right?"
    for where, label, value in used:
        assert value in emitted[label], f"{where} matches {label}={value!r}; the service emits {sorted(emitted[label])}"


def test_promtool_accepts_config_rules_and_dashboard_queries(tmp_path):
    require("promtool", shutil.which("promtool") is not None, "apt-get install prometheus")

    def promtool(*args: str) -> None:
        result = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr

    # The config names the rules by their in-container path; point it at the repository's so both are checked.
    config = _yaml(PROMETHEUS_CONFIG)
    config["rule_files"] = [str(RULES.parent / "*.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    promtool("check", "config", str(tmp_path / "prometheus.yml"))
    promtool("check", "rules", str(RULES))
    # promtool parses PromQL only inside rules: wrap each dashboard query, Grafana variables filled in.
    queries = [
        expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        for where, expr in _expressions()
        if where.startswith("panel ")
    ]
    rules = [{"record": f"dashboard:query_{i}:check", "expr": expr} for i, expr in enumerate(queries)]
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(tmp_path / "dashboard_rules.yml"))
