"""The GPU check's preparation: carried wheels, the kernel build, the `gpu` tests, and what machine this is.

Each function returns a JSON-able record for the report and raises nothing it can record instead: the check
runs once, on a lent machine, and a failed step must still leave a report.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
# What the service and the tests import from the wheels: checked after installing, so a missing dependency shows
# up here, named, rather than as a collection error in the middle of the tests.
SMOKE_IMPORTS = (
    "fastapi",
    "pydantic",
    "pydantic_settings",
    "uvicorn",
    "multipart",
    "redis",
    "ftfy",
    "open_clip",
    "pytest_asyncio",
    "service.app",
)
GPU_TEST_MARKS = ("requires_gpu", "mark.gpu")
SUMMARY = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?)\b")  # pytest's last line


# ------------------------------------------------------------------------------------------------ wheels


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # canonical: lower case, runs of -_. as one -
    version: str


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel(path: Path) -> Wheel:
    name, version = path.name.split("-")[:2]
    return Wheel(path, canonical(name), version)


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def wheel_requirements(path: Path) -> list[str]:
    """Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = archive.read(metadata).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def select_wheels(
    wheels: Sequence[Wheel],
    installed: Callable[[str], str | None] = installed_version,
    requirements: Callable[[Path], list[str]] = wheel_requirements,
) -> tuple[list[Wheel], list[str]]:
    """The wheels to install, and notes: every package this Python lacks, plus a package it has in a version too
    old for what is installed (typing-extensions for pydantic), when the carried wheel is new enough. Nothing
    it already has in a fitting version is replaced, so torch, numpy and friends are never shadowed."""
    by_name = {wheel.name: wheel for wheel in wheels}
    chosen = {wheel.name: wheel for wheel in wheels if installed(wheel.name) is None}
    notes: list[str] = []
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        return sorted(chosen.values(), key=lambda w: w.name), ["packaging missing: requirements not checked"]
    checked: set[str] = set()
    while pending := [name for name in chosen if name not in checked]:
        for name in pending:
            checked.add(name)
            for line in requirements(chosen[name].path):
                try:
                    requirement = Requirement(line)
                except InvalidRequirement:
                    continue
                if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                    continue
                needed = canonical(requirement.name)
                if needed in chosen:
                    continue
                have, ours = installed(needed), by_name.get(needed)
                if have is not None and requirement.specifier.contains(have, prereleases=True):
                    continue
                if ours is not None and requirement.specifier.contains(ours.version, prereleases=True):
                    chosen[needed] = ours
                    notes.append(f"{needed} {have} is too old for {name} ({requirement}): installing {ours.version}")
                else:
                    notes.append(f"{name} needs {requirement}; this Python has {have or 'none'} and no wheel fits")
    return sorted(chosen.values(), key=lambda w: w.name), notes


def activate_site(site: Path) -> None:
    """Put `site` first on this process's import path and on its children's (PYTHONPATH)."""
    entry = str(site)
    if entry not in sys.path:
        sys.path.insert(0, entry)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != entry]
    os.environ["PYTHONPATH"] = os.pathsep.join([entry, *paths])
    importlib.invalidate_caches()


def pip_install_command(wheels: Sequence[Wheel], site: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(site),
        *(str(w.path) for w in wheels),
    ]


def install_wheels(
    wheel_dir: Path, site: Path, installed: Callable[[str], str | None] = installed_version
) -> dict[str, Any]:
    """Install the carried wheels this Python lacks into `site` and activate it; then try the imports."""
    wheels = [parse_wheel(path) for path in sorted(Path(wheel_dir).glob("*.whl"))]
    if not wheels:
        record: dict[str, Any] = {"status": "skipped", "reason": f"no wheels in {wheel_dir}/", "installed": []}
    else:
        chosen, notes = select_wheels(wheels, installed)
        record = {
            "status": "ok",
            "installed": [f"{w.name}=={w.version}" for w in chosen],
            "already_present": sorted(f"{w.name} {installed(w.name)}" for w in wheels if w not in chosen),
            "notes": notes,
        }
        for note in notes:
            print(f"  note: {note}", flush=True)
        if chosen:
            result = subprocess.run(pip_install_command(chosen, site), capture_output=True, text=True)
            if result.returncode != 0:
                record.update(status="error", error=(result.stderr or result.stdout)[-2000:])
                return record
            activate_site(site)
            print(f"  installed into {site}: {', '.join(record['installed'])}", flush=True)
        else:
            print("  every carried package is already installed", flush=True)
    record["imports"] = import_check(SMOKE_IMPORTS)
    failed = {name: error for name, error in record["imports"].items() if error}
    if failed and record["status"] == "ok":
        record["status"] = "error"
        record["error"] = "; ".join(f"{name}: {error}" for name, error in failed.items())
    return record


def import_check(modules: Sequence[str]) -> dict[str, str | None]:
    """module -> None if it imports in a fresh interpreter with this environment, else the error."""
    code = (
        "import importlib, json, sys\nresult = {}\nfor name in sys.argv[1:]:\n    try:\n"
        "        importlib.import_module(name)\n        result[name] = None\n"
        "    except BaseException as error:\n        result[name] = f'{type(error).__name__}: {error}'[:300]\n"
        "print(json.dumps(result))\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=90, cwd=REPOSITORY
        )
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as error:
        return dict.fromkeys(modules, f"import check failed: {error}")


# ------------------------------------------------------------------------------------------------ kernel


def build_kernel(fatbin: Path) -> dict[str, Any]:
    from service.kernels.build import build

    start = time.perf_counter()
    try:
        path = build(fatbin)
    except (OSError, subprocess.CalledProcessError) as error:
        return {"status": "error", "error": str(error), "seconds": time.perf_counter() - start}
    return {
        "status": "ok",
        "path": str(path),
        "kib": path.stat().st_size / 1024,
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------------ subprocesses


@dataclass(frozen=True)
class Finished:
    returncode: int | None  # None: killed at the timeout
    tail: list[str]
    seconds: float


def run_streaming(command: Sequence[str], *, timeout: float, prefix: str = "  ", keep: int = 60) -> Finished:
    """Run `command` in its own process group, echo its output as it comes, keep the last lines; at the timeout
    kill the whole group (a server it started too)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=REPOSITORY,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # lines as they come, not when a pipe buffer fills
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        process_group=0,
    )
    tail: collections.deque[str] = collections.deque(maxlen=keep)

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip("\n"))
            print(prefix + line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode: int | None = process.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        # The group goes whether the command finished or not: nothing it started may outlive the check.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        reader.join(timeout=5)
    return Finished(returncode, list(tail), time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ gpu tests


def gpu_test_files(root: Path = REPOSITORY / "tests") -> list[Path]:
    """Test modules holding tests marked gpu (collecting only these keeps other modules' imports out)."""
    return sorted(
        path
        for path in root.rglob("test_*.py")
        if any(mark in path.read_text(errors="replace") for mark in GPU_TEST_MARKS)
    )


def pytest_command(files: Sequence[Path], junit: Path, per_test_timeout: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        # No gpu test is async, and a pytest-asyncio wheel that does not fit the machine's pytest would fail the
        # whole run at start-up; without it, pyproject's asyncio_* options only warn.
        "-p",
        "no:asyncio",
        "-q",
        "-o",
        f"timeout={per_test_timeout}",
        f"--junitxml={junit}",
        "--continue-on-collection-errors",
        *(str(path.relative_to(REPOSITORY)) for path in files),
    ]


def run_gpu_tests(junit: Path, *, timeout: float, per_test_timeout: int = 120) -> dict[str, Any]:
    files = gpu_test_files()
    if not files:
        return {"status": "error", "error": f"no test module under {REPOSITORY / 'tests'} holds gpu tests"}
    finished = run_streaming(pytest_command(files, junit, per_test_timeout), timeout=timeout, prefix="  | ")
    record: dict[str, Any] = {
        "files": [str(path.relative_to(REPOSITORY)) for path in files],
        "returncode": finished.returncode,
        "seconds": finished.seconds,
        "summary": next((line for line in reversed(finished.tail) if SUMMARY.search(line)), ""),
    }
    if finished.returncode is None:
        record["error"] = f"pytest killed after {timeout:.0f} s"
    if junit.is_file():
        record.update(parse_junit(junit))
    else:
        record.setdefault("error", "pytest wrote no junit report")
        record["tail"] = finished.tail[-30:]
    # pytest's 0 (all passed) and 5 (nothing collected) are not failures of the check itself.
    ok = finished.returncode in (0, 5) and not record.get("failures") and not record.get("errors")
    record["status"] = "ok" if ok else "failed"
    return record


def parse_junit(path: Path) -> dict[str, Any]:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed: list[dict[str, str]] = []
    reasons: collections.Counter[str] = collections.Counter()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind in ("failure", "error"):
            element = case.find(kind)
            if element is not None:
                message = (element.get("message") or element.text or "").strip().splitlines()
                failed.append({"test": name, "kind": kind, "message": (message[0] if message else "")[:300]})
        skipped = case.find("skipped")
        if skipped is not None:
            reasons[(skipped.get("message") or "").strip()[:200]] += 1
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {
        **counts,
        "passed": passed,
        "time": sum(float(s.get("time", 0)) for s in suites),
        "failed": failed,
        "skip_reasons": reasons.most_common(5),
    }


# ------------------------------------------------------------------------------------------------ the machine


def _command(*command: str) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPOSITORY)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "gpus": (
            _command("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
            or "none (nvidia-smi absent or failed)"
        ).splitlines(),
        "nvcc": ((_command("nvcc", "--version") or "absent").splitlines() or ["absent"])[-1],
        "commit": _command("git", "rev-parse", "HEAD") or "unknown",
    }
    status = _command("git", "status", "--porcelain", "--untracked-files=no")
    info["uncommitted_changes"] = None if status is None else len(status.splitlines())
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = bool(torch.cuda.is_available())
        if info["cuda_available"]:
            info["device"] = torch.cuda.get_device_name(0)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except Exception as error:  # a broken torch install is itself a finding for the report
        info["torch"] = f"unavailable ({type(error).__name__}: {error})"
        info["cuda_available"] = False
    for package in ("torchvision", "numpy", "cuda-bindings", "cupy-cuda13x", "triton", "onnxruntime"):
        info.setdefault("packages", {})[package] = installed_version(package)
    return info
