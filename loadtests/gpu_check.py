"""`make gpu-check`: on a lent GPU machine, build the CUDA kernel, run the tests marked gpu, benchmark, report.

    python3 -m loadtests.gpu_check --out gpu-report        # the GPU machine (make gpu-check), under 8 minutes
    python -m loadtests.gpu_check --dry-run --out /tmp/gc  # here, on a CPU: every step at tiny sizes

Steps, each timed and printed as it goes: install the carried wheels this Python lacks (`.whl/`, made here by
`python -m loadtests.gpu_wheels`), build the kernel's fatbin, `pytest -m gpu` on the test modules that hold gpu
tests, then four benchmark sections, each in its own process with its own time limit, so that one failure, hang
or poisoned CUDA context costs only that section: (a) the similarity kernel against PyTorch and numpy, (b) the
ViT-B-32 image tower in the torch engine, (c) CPU against GPU preprocessing, (d) `/classify` end to end.
Writes gpu-report.md (also printed), gpu-report.json (every raw number) and pytest-gpu.xml into --out.
docs/gpu-check.md describes the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from loadtests import gpu_check_setup as setup
from loadtests.gpu_check_config import Recorder, Section, config_for, run_guarded, to_json
from service.kernels import DEFAULT_FATBIN

# Section -> (module, function, time limit in seconds on the GPU); imported in the section's own process.
SECTIONS: dict[str, tuple[str, str, float]] = {
    "kernel": ("loadtests.gpu_check_bench", "kernel_section", 110),
    "engine": ("loadtests.gpu_check_bench", "engine_section", 75),
    "preprocess": ("loadtests.gpu_check_bench", "preprocess_section", 45),
    "serve": ("loadtests.gpu_check_serve", "serve_section", 100),
}
# issue 9: under 8 minutes. The step limits (tests, then the sections above) add up to about the budget, so a step
# that uses all of its time does not starve the ones after it (the last, /classify end to end, is an acceptance
# point too); each still gets no more than what is left.
BUDGET_S = 450.0
TESTS_TIMEOUT_S = 110.0
RESERVE_S = 5.0  # kept back from every step for writing the report
SITE = Path("/tmp/clipserve-site")


class Clock:
    def __init__(self, budget: float) -> None:
        self.start, self.budget = time.perf_counter(), budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def limit(self, wanted: float) -> float:
        """The time a step may take: what it wants, within what the budget has left."""
        return max(0.0, min(wanted, self.budget - self.elapsed() - RESERVE_S))


def timed_step(clock: Clock, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"[{clock.elapsed():6.1f} s] {name} ...", flush=True)
    start = time.perf_counter()
    try:
        record = run()
    except Exception as error:  # a step that breaks is reported, and the check goes on
        record = {"status": "error", "error": f"{type(error).__name__}: {error}"}
    record.setdefault("seconds", time.perf_counter() - start)
    print(
        f"[{clock.elapsed():6.1f} s] {name}: {record.get('status', 'done')} ({record['seconds']:.1f} s)"
        + (f" {record['error']}" if record.get("error") else ""),
        flush=True,
    )
    return record


def section_function(name: str) -> Section:
    import importlib

    module, function, _ = SECTIONS[name]
    return getattr(importlib.import_module(module), function)


def run_section_process(name: str, args: argparse.Namespace, device: str, timeout: float) -> dict[str, Any]:
    """One section in a child process of its own; its JSON (partial if it was killed) plus what went wrong."""
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as directory:
        result = Path(directory) / f"{name}.json"
        command = [
            sys.executable,
            "-m",
            "loadtests.gpu_check",
            "--section",
            name,
            "--result",
            str(result),
            "--device",
            device,
            "--fatbin",
            str(args.fatbin),
            *(["--dry-run"] if args.dry_run else []),
        ]
        finished = setup.run_streaming(command, timeout=timeout, prefix=f"  [{name}] ")
        data: dict[str, Any] = json.loads(result.read_text()) if result.is_file() else {}
    if finished.returncode is None:
        data.update(status="error", error=f"killed at its {timeout:.0f} s limit (rows finished by then are kept)")
    elif data.get("status") in (None, "running"):
        data.update(status="error", error=f"its process exited with {finished.returncode} before finishing")
    if data.get("status") == "error":
        data["tail"] = finished.tail[-30:]
    data.setdefault("seconds", finished.seconds)
    return data


def run_check(args: argparse.Namespace) -> int:
    clock = Clock(args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "meta": {
            "started": _now(),
            "dry_run": args.dry_run,
            "budget_s": args.budget,
            "command": "python3 -m loadtests.gpu_check" + (" --dry-run" if args.dry_run else ""),
        },
        "steps": {},
        "sections": {},
    }
    steps = results["steps"]
    steps["wheels"] = timed_step(clock, "carried wheels", lambda: setup.install_wheels(args.wheels, args.site))
    results["machine"] = machine = setup.machine_info()
    print(
        f"  machine: {machine.get('device', 'no CUDA GPU')}; torch {machine.get('torch')}; "
        f"commit {machine.get('commit')}",
        flush=True,
    )
    steps["build"] = timed_step(clock, "kernel build", lambda: setup.build_kernel(args.fatbin))
    if args.skip_tests:
        steps["pytest"] = {"status": "skipped", "error": "--skip-tests"}
    else:
        steps["pytest"] = timed_step(
            clock,
            "pytest -m gpu",
            lambda: setup.run_gpu_tests(out / "pytest-gpu.xml", timeout=clock.limit(TESTS_TIMEOUT_S)),
        )
    cuda = bool(machine.get("cuda_available")) and not args.dry_run
    for name in args.sections:
        timeout = clock.limit(SECTIONS[name][2] * (1 if cuda else 1.5))
        if not cuda and not args.dry_run:
            record: dict[str, Any] = {"status": "skipped", "reason": "no CUDA GPU (--dry-run proves the plumbing)"}
        elif timeout < 10:
            record = {"status": "skipped", "reason": f"out of the {args.budget:.0f} s budget"}
        else:
            device = "cuda" if cuda else "cpu"
            record = timed_step(clock, f"section {name}", partial(run_section_process, name, args, device, timeout))
        results["sections"][name] = record
    results["meta"].update(finished=_now(), total_s=clock.elapsed())
    report = write_report(results, out)
    print("\n" + report, flush=True)
    print(f"[{clock.elapsed():6.1f} s] report written to {out / 'gpu-report.md'} and gpu-report.json", flush=True)
    return 0 if check_succeeded(results) else 1


def write_report(results: dict[str, Any], out: Path) -> str:
    from loadtests.gpu_check_report import render

    report = render(results)
    (out / "gpu-report.json").write_text(json.dumps(results, default=to_json, indent=1))
    (out / "gpu-report.md").write_text(report)
    return report


def check_succeeded(results: dict[str, Any]) -> bool:
    """Every step and section ran (skips allowed) and the gpu tests passed; the targets are the report's verdict."""
    records = [*results["steps"].values(), *results["sections"].values()]
    return all(record.get("status") in ("ok", "skipped") for record in records)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_child(args: argparse.Namespace) -> int:
    config = config_for(dry_run=args.dry_run, cuda=args.device == "cuda", fatbin=args.fatbin)
    run_guarded(section_function(args.section), config, Recorder(args.result))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m loadtests.gpu_check",
        description=__doc__.split("\n\n")[0],
        epilog="Sections: " + ", ".join(SECTIONS) + ". Report format: docs/gpu-check.md.",
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-report"), help="report folder (default gpu-report)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU; GPU measurements say why absent")
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        type=lambda text: [s for s in text.split(",") if s],
        help="comma-separated subset of the benchmark sections (default: all)",
    )
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for everything (default {BUDGET_S:g})")
    parser.add_argument("--wheels", type=Path, default=Path(".whl"), help="carried wheels (default .whl)")
    parser.add_argument("--site", type=Path, default=SITE, help=f"where they are installed (default {SITE})")
    parser.add_argument("--fatbin", type=Path, default=DEFAULT_FATBIN, help="the kernel to build and load")
    # One section in this process (how run_check starts each section).
    parser.add_argument("--section", choices=sorted(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Children (pytest, the sections, the server) run from the repository root, wherever this was started.
    args.fatbin, args.out = args.fatbin.resolve(), args.out.resolve()
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_child(args) if args.section else run_check(args)


if __name__ == "__main__":
    sys.exit(main())
