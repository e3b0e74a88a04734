"""`make loadtest`: a bounded headless Locust run against a running clipserve, and a short Markdown summary.

    python -m loadtests.run --host http://127.0.0.1:8000                      # 16 users, 60 s, all user classes
    python -m loadtests.run --host URL --users 32 --run-time 5m --out /tmp/lt --user-classes FixedLabelsUser
    python -m loadtests.run --host URL --labels 50 --templates imagenet       # other options go to Locust

It waits (briefly) for the server's /readyz, reads /v1/models and snapshots /metrics, runs Locust on
loadtests/locustfile.py headless as a subprocess (printing a progress line every few seconds), snapshots
/metrics again and writes into --out: Locust's CSV files (locust_stats.csv, locust_failures.csv, ...), its
HTML report (report.html) and summary.md (requests, requests/s, p50/p95/p99 and failures per request name
and in total, from locust_stats.csv; the label cache's hit ratio per tier over the run, from the
difference of clipserve_label_cache_total between the two snapshots). The summary is printed too.

Exit status: 0 when every request succeeded, 1 when any failed (or Locust itself failed), 2 when the server
was not ready or Locust is not installed. It talks to the service over HTTP only (it imports neither
`service` nor `models`), so it works against any deployment; the cache numbers come from the one replica
that answers --metrics-url and include any other traffic that replica served during the run.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
USER_CLASSES = ("FixedLabelsUser", "MultiImageUser", "FreshLabelsUser", "EmbedUser")
CACHE_METRIC = "clipserve_label_cache_total"
CSV_PREFIX = "locust"

# (sample name, sorted label pairs) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# ------------------------------------------------------------------------------------------ metrics, over HTTP


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by its name and labels."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def metrics_delta(before: Samples, after: Samples, name: str) -> tuple[dict[tuple[tuple[str, str], ...], float], bool]:
    """`name`'s samples after minus before (absent before = 0); True as well when a counter went backwards
    (the server restarted during the run), in which case the after values are taken as they are."""
    delta: dict[tuple[tuple[str, str], ...], float] = {}
    reset = False
    for (sample, labels), value in after.items():
        if sample != name:
            continue
        change = value - before.get((sample, labels), 0.0)
        if change < 0:
            reset, change = True, value
        delta[labels] = change
    return delta, reset


@dataclass(frozen=True)
class CacheTier:
    tier: str
    lookups: float
    hits: float

    @property
    def misses(self) -> float:  # includes 'malformed' (Redis held something unreadable)
        return self.lookups - self.hits

    @property
    def hit_ratio(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None


def cache_tiers(delta: Mapping[tuple[tuple[str, str], ...], float]) -> list[CacheTier]:
    """Per tier (memory first), lookups and hits from clipserve_label_cache_total{tier,result} deltas."""
    lookups: dict[str, float] = {}
    hits: dict[str, float] = {}
    for labels, value in delta.items():
        tags = dict(labels)
        tier = tags.get("tier", "?")
        lookups[tier] = lookups.get(tier, 0.0) + value
        if tags.get("result") == "hit":
            hits[tier] = hits.get(tier, 0.0) + value
    order = {"memory": 0, "redis": 1}
    return [CacheTier(t, lookups[t], hits.get(t, 0.0)) for t in sorted(lookups, key=lambda t: (order.get(t, 2), t))]


def http_get(url: str, api_key: str = "", timeout: float = 5.0) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


def wait_ready(host: str, timeout: float) -> str | None:
    """None once /readyz answers 200 within `timeout` seconds, else why not."""
    deadline = time.monotonic() + timeout
    reason = "no answer"
    while True:
        try:
            status, body = http_get(f"{host}/readyz", timeout=max(1.0, min(5.0, timeout)))
            if status == 200:
                return None
            reason = f"/readyz answered {status}: {body[:200]}"
        except (OSError, ValueError) as error:  # URLError, connection refused, timeouts, a malformed URL
            reason = f"/readyz: {getattr(error, 'reason', error)}"
        if time.monotonic() >= deadline:
            return reason
        time.sleep(0.5)


def served_model(host: str, api_key: str) -> str:
    """'name (engine)' from GET /v1/models, or what went wrong."""
    try:
        status, body = http_get(f"{host}/v1/models", api_key)
        if status != 200:
            return f"unknown (/v1/models answered {status})"
        card = json.loads(body)["data"][0]
        return f"{card['id']} ({card.get('engine', '?')})"
    except (OSError, ValueError, KeyError, IndexError) as error:
        return f"unknown ({error})"


def snapshot(metrics_url: str) -> tuple[Samples | None, str]:
    try:
        status, body = http_get(metrics_url, timeout=10)
        if status != 200:
            return None, f"{metrics_url} answered {status}"
        return parse_metrics(body), ""
    except (OSError, ValueError) as error:
        return None, f"{metrics_url}: {error}"


# ------------------------------------------------------------------------------------------ Locust's CSV files


@dataclass(frozen=True)
class StatsRow:
    name: str  # "POST /classify fixed labels", or "total" for Locust's Aggregated row
    requests: int
    failures: int
    rps: float
    p50: str
    p95: str
    p99: str

    @property
    def failure_percent(self) -> float:
        return 100.0 * self.failures / self.requests if self.requests else 0.0


def read_stats(path: Path) -> list[StatsRow]:
    """Rows of Locust's `<prefix>_stats.csv`: one per request name, then the total."""
    rows = []
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            total = row["Name"] == "Aggregated"
            rows.append(
                StatsRow(
                    name="total" if total else f"{row['Type']} {row['Name']}".strip(),
                    requests=int(row["Request Count"]),
                    failures=int(row["Failure Count"]),
                    rps=float(row["Requests/s"]),
                    p50=row["50%"],
                    p95=row["95%"],
                    p99=row["99%"],
                )
            )
    return rows


def read_failures(path: Path) -> list[tuple[str, str, int]]:
    """(request, error, occurrences) from Locust's `<prefix>_failures.csv`, most frequent first."""
    if not path.exists():
        return []
    with path.open(newline="") as file:
        rows = [
            (f"{r['Method']} {r['Name']}", _message(r["Error"]), int(r["Occurrences"])) for r in csv.DictReader(file)
        ]
    return sorted(rows, key=lambda r: -r[2])


def _message(error: str) -> str:
    """The message of a failure the locustfile reported: Locust writes it as CatchResponseError('<message>')."""
    match = re.fullmatch(r"CatchResponseError\((.*)\)", error, re.DOTALL)
    if match:
        with contextlib.suppress(ValueError, SyntaxError):
            message = ast.literal_eval(match.group(1))
            if isinstance(message, str):
                return message
    return error


def read_exceptions(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open(newline="") as file:
        return sum(int(r["Count"]) for r in csv.DictReader(file))


def progress_rows(history: Path) -> list[dict[str, str]]:
    """The Aggregated rows of `<prefix>_stats_history.csv` so far (Locust appends one a second and flushes the
    file every 5 s, so the newest row can be a few seconds old)."""
    try:
        with history.open(newline="") as file:
            return [row for row in csv.DictReader(file) if row.get("Name") == "Aggregated"]
    except (OSError, csv.Error):
        return []


def progress_line(rows: Sequence[Mapping[str, str]]) -> str:
    first, r = rows[0], rows[-1]
    elapsed = int(r["Timestamp"]) - int(first["Timestamp"])
    return (
        f"[{elapsed:4d} s] {r['User Count']} users, {float(r['Requests/s']):.1f} req/s, {r['Total Request Count']}"
        f" requests, {r['Total Failure Count']} failed, p50 {r['50%']} ms, p95 {r['95%']} ms, p99 {r['99%']} ms"
    )


# ------------------------------------------------------------------------------------------------- summary


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def summary_markdown(
    *,
    stats: Sequence[StatsRow],
    tiers: Sequence[CacheTier] | None,
    facts: Mapping[str, str],
    failures: Sequence[tuple[str, str, int]] = (),
    exceptions: int = 0,
    cache_note: str = "",
) -> str:
    """The report: facts (date, host, model, users, ...), a requests table, the label cache, the failures."""
    lines = ["# clipserve load test", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += [
        "",
        "| request | requests | requests/s | p50 ms | p95 ms | p99 ms | failures | failures % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in stats:
        name = "**total**" if row.name == "total" else _cell(row.name)
        lines.append(
            f"| {name} | {row.requests} | {row.rps:.1f} | {row.p50} | {row.p95} | {row.p99} "
            f"| {row.failures} | {row.failure_percent:.2f}% |"
        )
    lines += ["", "Label cache over the run (server-side `clipserve_label_cache_total`, after minus before):", ""]
    if tiers is None:
        lines.append(f"not available: {cache_note}")
    elif not any(t.lookups for t in tiers):
        lines.append("no label lookups during the run")
    else:
        lines += ["| tier | lookups | hits | misses | hit ratio |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {t.tier} | {t.lookups:.0f} | {t.hits:.0f} | {t.misses:.0f} | {_ratio(t.hit_ratio)} |" for t in tiers
        ]
        if cache_note:
            lines += ["", cache_note]
    total = next((row for row in stats if row.name == "total"), None)
    failed = total.failures if total else 0
    if failures:
        lines += ["", "| failed request | error | count |", "|---|---|---:|"]
        lines += [f"| {_cell(name)} | {_cell(error)[:300]} | {count} |" for name, error, count in failures[:20]]
    if exceptions:
        lines += ["", f"{exceptions} exceptions in the Locust users themselves (locust_exceptions.csv)."]
    lines += ["", f"**Result: {'FAILED' if failed else 'passed'}** — {failed} failed requests."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ run


def locust_command() -> list[str] | None:
    beside = Path(sys.executable).with_name("locust")
    if beside.exists():
        return [str(beside)]
    try:
        import locust  # noqa: F401  (only whether it is installed)
    except ImportError:
        return None
    return [sys.executable, "-m", "locust"]


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # never swallow a Locust option that starts like one of ours
        epilog="Unknown options are passed to Locust (and the locustfile: --labels, --fresh-labels, "
        "--images-per-request, --image-size, --templates, --label-pool).",
    )
    parser.add_argument("--host", default="http://127.0.0.1:8000", help="the running service (default %(default)s)")
    parser.add_argument("-u", "--users", type=int, default=16, help="concurrent users (default %(default)s)")
    parser.add_argument(
        "-r", "--spawn-rate", type=float, default=None, help="users started per second (default: all at once)"
    )
    parser.add_argument("-t", "--run-time", default="60s", help="how long to run, e.g. 20s, 5m (default %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=Path("loadtests/results"), help="output folder (default %(default)s)"
    )
    parser.add_argument(
        "--user-classes",
        "--users-classes",
        nargs="+",
        default=list(USER_CLASSES),
        metavar="CLASS",
        help=f"Locust user classes (default: all, weighted: {' '.join(USER_CLASSES)})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("CLIPSERVE_API_KEY", ""),
        help="sent as Authorization: Bearer (default: $CLIPSERVE_API_KEY, else none)",
    )
    parser.add_argument("--metrics-url", default=None, help="Prometheus endpoint to read (default: HOST/metrics)")
    parser.add_argument(
        "--ready-timeout", type=float, default=10.0, help="seconds to wait for /readyz (default %(default)s)"
    )
    parser.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines (0: none)")
    args, extra = parser.parse_known_args(argv)
    args.host = args.host.rstrip("/")
    args.metrics_url = args.metrics_url or f"{args.host}/metrics"
    if args.spawn_rate is None:
        args.spawn_rate = float(args.users)
    return args, extra


SPAWNED = re.compile(r"All users spawned: (\{[^}]*\})")


def run_locust(
    command: list[str], history: Path, progress_every: float, api_key: str = ""
) -> tuple[int, float, dict[str, int]]:
    """Runs Locust to the end: its log passes through, a progress line every `progress_every` s (0: none).

    Returns its exit status, how long it ran and how many users of each class it started."""
    start = time.monotonic()
    env = {**os.environ, "CLIPSERVE_API_KEY": api_key}  # the locustfile's --api-key default; not in `ps`
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    spawned: dict[str, int] = {}

    def relay() -> None:  # Locust logs to stderr: pass it on, and note the users per class
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            if match := SPAWNED.search(line):
                with contextlib.suppress(ValueError):
                    spawned.update(json.loads(match.group(1)))

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    next_line, shown = start + progress_every, 0
    try:
        while process.poll() is None:
            time.sleep(0.2)
            if progress_every > 0 and time.monotonic() >= next_line:
                next_line += progress_every
                rows = progress_rows(history)
                if len(rows) > max(shown, 1):  # something new since the last line, past the empty first row
                    shown = len(rows)
                    print(progress_line(rows), flush=True)
    except KeyboardInterrupt:  # Ctrl-C reached Locust too: let it stop and write its files, then summarise
        print("interrupted: waiting for Locust to write its results", file=sys.stderr, flush=True)
        process.wait()
    relay_thread.join(timeout=10)
    return process.returncode, time.monotonic() - start, spawned


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(argv)
    locust = locust_command()
    if locust is None:
        print("error: Locust is not installed; pip install -e '.[loadtest]'", file=sys.stderr)
        return 2
    problem = wait_ready(args.host, args.ready_timeout)
    if problem is not None:
        print(
            f"error: {args.host} is not ready after {args.ready_timeout:g} s ({problem}).\n"
            "Start the service first (make serve, or clipserve serve) or pass --host.",
            file=sys.stderr,
        )
        return 2
    model = served_model(args.host, args.api_key)
    before, before_error = snapshot(args.metrics_url)

    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / CSV_PREFIX
    for old in [*args.out.glob(f"{CSV_PREFIX}_*.csv"), args.out / "report.html", args.out / "summary.md"]:
        old.unlink(missing_ok=True)  # a stale file must not pass for this run's
    command = [
        *locust,
        "-f",
        str(LOCUSTFILE),
        "--host",
        args.host,
        "--headless",
        "--users",
        str(args.users),
        "--spawn-rate",
        f"{args.spawn_rate:g}",
        "--run-time",
        args.run_time,
        "--csv",
        str(prefix),
        "--html",
        str(args.out / "report.html"),
        "--only-summary",
        *extra,
        *args.user_classes,
    ]
    started = datetime.now(UTC)
    print(f"locust: {len(args.user_classes)} user classes, {args.users} users, {args.run_time} against {args.host}")
    print(f"model: {model}", flush=True)
    returncode, seconds, spawned = run_locust(
        command, prefix.with_name(f"{CSV_PREFIX}_stats_history.csv"), args.progress_every, args.api_key
    )

    stats_path = prefix.with_name(f"{CSV_PREFIX}_stats.csv")
    if not stats_path.exists():
        print(f"error: Locust exited with {returncode} and wrote no {stats_path}", file=sys.stderr)
        return returncode or 1
    stats = read_stats(stats_path)

    after, after_error = snapshot(args.metrics_url)
    tiers: list[CacheTier] | None = None
    cache_note = before_error or after_error
    if before is not None and after is not None:
        delta, reset = metrics_delta(before, after, CACHE_METRIC)
        tiers = cache_tiers(delta)
        if reset:
            cache_note = "Some counters went backwards (the server restarted?): those show their values since then."
    facts = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "host": args.host,
        "model": model,
        "users": f"{args.users} (spawn rate {args.spawn_rate:g}/s): "
        + ", ".join(f"{name} {spawned[name]}" if name in spawned else name for name in args.user_classes),
        "run time": f"{args.run_time} (the Locust process took {seconds:.1f} s, start and shutdown included)",
        "extra Locust options": " ".join(extra) or "none",
        "files": f"{prefix.name}_stats.csv, {prefix.name}_failures.csv, report.html (in {args.out})",
    }
    text = summary_markdown(
        stats=stats,
        tiers=tiers,
        facts=facts,
        failures=read_failures(prefix.with_name(f"{CSV_PREFIX}_failures.csv")),
        exceptions=read_exceptions(prefix.with_name(f"{CSV_PREFIX}_exceptions.csv")),
        cache_note=cache_note,
    )
    (args.out / "summary.md").write_text(text)
    print()
    print(text, end="")
    print(f"\nwritten: {args.out / 'summary.md'}, {args.out / 'report.html'}, {prefix}_*.csv")
    total = next((row for row in stats if row.name == "total"), None)
    if total is None or total.requests == 0:
        print("error: no requests were made", file=sys.stderr)
        return 1
    if total.failures or returncode != 0:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
