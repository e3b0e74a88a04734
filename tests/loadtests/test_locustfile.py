"""The load test: the Locust users against a real server through `python -m loadtests.run` (what `make loadtest`
runs), and the summary's arithmetic on hand-written inputs."""

from __future__ import annotations

import ast
import csv
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.run import (
    CacheTier,
    StatsRow,
    cache_tiers,
    metrics_delta,
    parse_metrics,
    read_failures,
    read_stats,
    summary_markdown,
)
from tests.service.conftest import free_port, live_server

ROOT = Path(__file__).resolve().parents[2]
KEY = "sesame"
LABELS = 10  # --labels: fixed labels per request
FRESH = 10  # the locustfile's default --fresh-labels
CACHE = "clipserve_label_cache_total"


def locust_installed() -> bool:
    return Path(sys.executable).with_name("locust").exists()


def loadtest(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "loadtests.run", "--progress-every", "1", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[object, str]]:
    if not locust_installed():
        pytest.skip("locust is not installed (dev extra)")
    with live_server(api_keys=KEY) as running:
        yield running


def summary_tables(text: str) -> list[list[list[str]]]:
    """The Markdown tables of a summary: rows of cells, header and separator left out."""
    tables: list[list[list[str]]] = []
    rows: list[list[str]] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            rows = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if rows is None:
            rows = []
            tables.append(rows)
        elif not set(cells[0]) <= set("-:"):
            rows.append(cells)
    return tables


def test_headless_run_has_no_failures_and_the_summary_matches(server, tmp_path):
    app, url = server
    out = tmp_path / "results"
    result = loadtest(
        "--host", url, "--users", "10", "--run-time", "4s", "--out", str(out), "--api-key", KEY,
        "--labels", str(LABELS),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("locust_stats.csv", "locust_failures.csv", "report.html", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    assert summary in result.stdout  # printed as well as written
    assert "clipserve-demo" in summary  # /v1/models, read with the API key
    assert "FixedLabelsUser 6, MultiImageUser 2, FreshLabelsUser 1, EmbedUser 1" in summary
    assert "**Result: passed**" in summary

    # Every row of the requests table is the CSV's row, to the digit.
    with (out / "locust_stats.csv").open(newline="") as file:
        stats = {f"{r['Type']} {r['Name']}".strip(): r for r in csv.DictReader(file)}
    requests_table, cache_table = summary_tables(summary)
    assert len(requests_table) == len(stats)
    for name, count, rps, p50, p95, p99, failures, percent in requests_table:
        row = stats["Aggregated" if name == "**total**" else name]
        assert (count, p50, p95, p99, failures) == (
            row["Request Count"], row["50%"], row["95%"], row["99%"], row["Failure Count"]
        )  # fmt: skip
        assert rps == f"{float(row['Requests/s']):.1f}"
        assert (failures, percent) == ("0", "0.00%")
    count = {name: int(row["Request Count"]) for name, row in stats.items()}
    fixed, multi, fresh = (count[f"POST /classify {kind}"] for kind in ("fixed labels", "4 images", "fresh labels"))
    assert fixed > 0 and multi > 0 and fresh > 0
    assert count.get("POST /embed texts", 0) + count.get("POST /embed images", 0) > 0

    # The label cache: fresh labels missed, fixed labels hit; the summary's delta agrees with the app's counters.
    metrics = app.state.metrics
    [(tier, lookups, hits, misses, ratio)] = cache_table
    assert tier == "memory"  # no Redis configured
    lookups, hits, misses = int(lookups), int(hits), int(misses)
    assert lookups == hits + misses and ratio == f"{100 * hits / lookups:.1f}%"
    assert misses >= fresh * FRESH  # every fresh label of every completed request missed
    assert hits >= (fixed + multi - 8) * LABELS  # only the first requests of the 8 fixed-label users can miss
    assert hits <= metrics.value(CACHE, {"tier": "memory", "result": "hit"})
    assert misses <= metrics.value(CACHE, {"tier": "memory", "result": "miss"})
    assert metrics.value("clipserve_requests_total", {"route": "/classify", "status": "200"}) >= fixed + multi + fresh


def test_failed_requests_fail_the_run(server, tmp_path):
    _, url = server
    out = tmp_path / "results"
    result = loadtest("--host", url, "-u", "1", "-t", "2s", "--out", str(out), "--user-classes", "FixedLabelsUser")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # no API key: every request 401
    summary = (out / "summary.md").read_text()
    assert "**Result: FAILED**" in summary
    assert "no label lookups during the run" in summary  # refused before any label was looked at
    [requests_table, failures_table] = summary_tables(summary)
    assert requests_table[-1][0] == "**total**" and requests_table[-1][-1] == "100.00%"
    assert failures_table[0][0] == "POST /classify fixed labels" and failures_table[0][1].startswith("401: ")


def test_a_server_that_is_not_ready_is_an_error(tmp_path):
    result = loadtest("--host", f"http://127.0.0.1:{free_port()}", "--ready-timeout", "0.5", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "is not ready after 0.5 s" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing run, nothing written


PROMETHEUS_BEFORE = """\
# HELP clipserve_label_cache_total Label-vector lookups by tier and result.
# TYPE clipserve_label_cache_total counter
clipserve_label_cache_total{result="hit",tier="memory"} 100.0
clipserve_label_cache_total{result="miss",tier="memory"} 20.0
clipserve_label_cache_total{result="miss",tier="redis"} 20.0
# HELP clipserve_requests_total HTTP requests by route and status.
# TYPE clipserve_requests_total counter
clipserve_requests_total{route="/classify",status="200"} 7.0
"""
PROMETHEUS_AFTER = """\
# HELP clipserve_label_cache_total Label-vector lookups by tier and result.
# TYPE clipserve_label_cache_total counter
clipserve_label_cache_total{result="hit",tier="memory"} 1000.0
clipserve_label_cache_total{result="miss",tier="memory"} 70.0
clipserve_label_cache_total{result="hit",tier="redis"} 30.0
clipserve_label_cache_total{result="miss",tier="redis"} 35.0
clipserve_label_cache_total{result="malformed",tier="redis"} 5.0
# HELP clipserve_label_cache_created Label-vector lookups by tier and result.
# TYPE clipserve_label_cache_created gauge
clipserve_label_cache_created{result="hit",tier="memory"} 1.7e9
# HELP clipserve_requests_total HTTP requests by route and status.
# TYPE clipserve_requests_total counter
clipserve_requests_total{route="/classify",status="200"} 57.0
"""


def test_cache_hit_ratio_per_tier_from_two_snapshots():
    before, after = parse_metrics(PROMETHEUS_BEFORE), parse_metrics(PROMETHEUS_AFTER)
    assert before[(CACHE, (("result", "hit"), ("tier", "memory")))] == 100.0
    delta, reset = metrics_delta(before, after, CACHE)
    assert not reset
    assert delta == {
        (("result", "hit"), ("tier", "memory")): 900.0,
        (("result", "miss"), ("tier", "memory")): 50.0,
        (("result", "hit"), ("tier", "redis")): 30.0,  # absent before: counted from 0
        (("result", "miss"), ("tier", "redis")): 15.0,
        (("result", "malformed"), ("tier", "redis")): 5.0,
    }
    memory, redis = cache_tiers(delta)
    assert (memory.tier, memory.lookups, memory.hits, memory.misses) == ("memory", 950, 900, 50)
    assert memory.hit_ratio == pytest.approx(900 / 950)
    assert (redis.tier, redis.lookups, redis.hits, redis.misses) == ("redis", 50, 30, 20)  # malformed is a miss
    assert CacheTier("redis", 0, 0).hit_ratio is None


def test_a_server_restart_during_the_run_is_noticed():
    delta, reset = metrics_delta(parse_metrics(PROMETHEUS_AFTER), parse_metrics(PROMETHEUS_BEFORE), CACHE)
    assert reset
    assert delta[(("result", "hit"), ("tier", "memory"))] == 100.0  # the values since the restart


STATS_CSV = """\
Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,\
Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
POST,/classify fixed labels,300,0,41,45.2,10.1,300.5,1900.0,15.04,0.0,41,45,50,52,60,75,90,120,300,300,300
POST,/embed texts,100,3,20,22.0,5.0,80.0,10000.0,5.01,0.15,20,21,22,23,25,30,40,50,80,80,80
,Aggregated,400,3,38,39.4,5.0,300.5,3925.0,20.05,0.15,38,42,47,50,58,70,85,110,300,300,300
"""


def test_summary_table_from_locust_csv(tmp_path):
    path = tmp_path / "locust_stats.csv"
    path.write_text(STATS_CSV)
    rows = read_stats(path)
    assert rows == [
        StatsRow("POST /classify fixed labels", 300, 0, 15.04, "41", "75", "120"),
        StatsRow("POST /embed texts", 100, 3, 5.01, "20", "30", "50"),
        StatsRow("total", 400, 3, 20.05, "38", "70", "110"),
    ]
    text = summary_markdown(
        stats=rows,
        tiers=[CacheTier("memory", 950, 900)],
        facts={"host": "http://h:8000", "model": "clipserve-demo (cpu)"},
        failures=[("POST /embed texts", "503: {'error': 'overloaded'} | more", 3)],
    )
    assert "- host: http://h:8000\n- model: clipserve-demo (cpu)\n" in text
    assert "| POST /classify fixed labels | 300 | 15.0 | 41 | 75 | 120 | 0 | 0.00% |" in text
    assert "| POST /embed texts | 100 | 5.0 | 20 | 30 | 50 | 3 | 3.00% |" in text
    assert "| **total** | 400 | 20.1 | 38 | 70 | 110 | 3 | 0.75% |" in text
    assert "| memory | 950 | 900 | 50 | 94.7% |" in text
    assert "| POST /embed texts | 503: {'error': 'overloaded'} \\| more | 3 |" in text
    assert text.endswith("**Result: FAILED** — 3 failed requests.\n")
    assert "no label lookups during the run" in summary_markdown(
        stats=rows, tiers=[CacheTier("memory", 0, 0)], facts={}
    )
    assert "not available: /metrics answered 404" in summary_markdown(
        stats=rows, tiers=None, facts={}, cache_note="/metrics answered 404"
    )


@pytest.mark.parametrize("name", ["run.py", "locustfile.py"])
def test_loadtests_talk_http_only(name):
    tree = ast.parse((ROOT / "loadtests" / name).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"service", "models", "export"}


FAILURES_CSV = """\
Method,Name,Error,Occurrences,First Seen,Last Seen
POST,/embed texts,"CatchResponseError('503: {""error"":{""code"":""overloaded"",""message"":""it\\'s full""}}')",2,a,b
POST,/classify fixed labels,"CatchResponseError('401: {""error"":{}}')",7,a,b
POST,/classify 4 images,"ConnectionRefusedError(111, 'Connection refused')",1,a,b
"""


def test_failures_are_read_most_frequent_first_with_their_messages(tmp_path):
    path = tmp_path / "locust_failures.csv"
    path.write_text(FAILURES_CSV)
    assert read_failures(path) == [
        ("POST /classify fixed labels", '401: {"error":{}}', 7),
        ("POST /embed texts", '503: {"error":{"code":"overloaded","message":"it\'s full"}}', 2),
        ("POST /classify 4 images", "ConnectionRefusedError(111, 'Connection refused')", 1),
    ]
    assert read_failures(tmp_path / "absent.csv") == []
