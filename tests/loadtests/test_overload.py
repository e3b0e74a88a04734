"""The overload script: a short real run against the real server (its exit status and report), and its
acceptance rules on hand-written outcomes."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import httpx

from loadtests.overload import Check, OpenLoop, Outcome, Report, evaluate, judge, markdown

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_overload_run_passes_and_reports(tmp_path):
    out = tmp_path / "overload.md"
    command = [
        *(sys.executable, "-m", "loadtests.overload", "--out", str(out)),
        *("--duration", "5", "--capacity-s", "2", "--idle-s", "1", "--recovery", "10"),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "capacity:" in result.stdout and "sent " in result.stdout  # progress lines
    report = out.read_text()
    assert "Overall: **PASS**" in report
    assert report.count("| PASS |") == 7 and "| FAIL |" not in report
    refused = re.search(r"\| answers: 503 with Retry-After \| (\d+)", report)
    assert refused and int(refused[1]) > 0, report
    assert re.search(r"\| server RSS before / peak / after \| \d+ / \d+ / \d+ MB \|", report), report
    assert "`CLIPSERVE_MAX_CONCURRENT_REQUESTS=16`" in report


def response(status: int, *, headers: dict[str, str] | None = None, json: object = None) -> httpx.Response:
    return httpx.Response(status, headers=headers, json=json)


def test_judge_accepts_only_200s_and_well_formed_503s():
    error = {"error": {"code": "overloaded", "message": "busy", "param": None}}
    assert judge(response(200, json={"results": [{}]}), 5, images=1).problem is None
    assert judge(response(200, json={"results": []}), 5, images=1).problem
    good = judge(response(503, headers={"Retry-After": "1"}, json=error), 5, images=1)
    assert good.problem is None and good.retry_after and good.error_code == "overloaded"
    assert "Retry-After" in (judge(response(503, json=error), 5, images=1).problem or "")
    assert "error shape" in (judge(response(503, headers={"Retry-After": "1"}, json={}), 5, images=1).problem or "")
    assert "status 500" in (judge(response(500, json=error), 5, images=1).problem or "")


def canned(outcomes: list[Outcome], *, peak: float = 250, recovery_ms: float = 30, exit_code: int = 0) -> Report:
    args = argparse.Namespace(
        request_timeout_s=10.0, rss_bound_mb=300.0, grace_s=4.0, concurrency=4, capacity_s=4.0, multiplier=4.0,
        duration=20.0, images=1, image_size=(1600, 1200),
    )  # fmt: skip
    report = Report({"CLIPSERVE_MAX_CONCURRENT_REQUESTS": "16"}, args, baseline_ms=25.0, capacity_rps=20.0)
    report.offered_rps = 80.0
    report.overload = OpenLoop(outcomes, sent=len(outcomes), send_span_s=20.0, client_in_flight_peak=20)
    report.recovery = [Outcome(200, recovery_ms) for _ in range(5)]
    report.ready_after = 200
    report.rss = {"before": 200.0, "peak": peak, "after": 210.0}
    report.exit_code, report.exit_s = exit_code, 1.5
    report.checks = evaluate(report)
    return report


def failed(report: Report) -> list[str]:
    return [c.name for c in report.checks if not c.passed]


def test_evaluate_fails_each_broken_promise():
    fine = [Outcome(200, 300.0)] * 10 + [Outcome(503, 5.0, retry_after=True, error_code="overloaded")] * 30
    assert failed(canned(fine)) == []
    assert "Overall: **PASS**" in markdown(canned(fine))
    reset = [*fine, Outcome(None, 3.0, problem="ReadError: connection reset")]
    assert failed(canned(reset)) == [evaluate(canned(fine))[0].name]
    assert "within CLIPSERVE_REQUEST_TIMEOUT_S" in failed(canned([*fine, Outcome(200, 12_000.0)]))[0]
    assert "peak RSS" in failed(canned(fine, peak=600))[0]
    assert "recovery p50" in failed(canned(fine, recovery_ms=200))[0]
    assert "SIGTERM" in failed(canned(fine, exit_code=1))[0]
    assert "overload was real" in failed(canned([Outcome(200, 300.0)] * 10))[0]
    assert all(isinstance(c, Check) for c in canned(fine).checks)
