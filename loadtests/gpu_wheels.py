"""Download, here, the wheels the GPU check machine lacks: `python -m loadtests.gpu_wheels --dest .whl`.

The lent GPU machine (issue 9: Python 3.12, torch with CUDA, no network) has no FastAPI, pydantic, uvicorn,
open_clip, ... ; `make gpu-check` carries them as wheels in the ignored folder `.whl/`, and loadtests.gpu_check
installs the ones that machine is missing. Each package is pinned to the version installed in the environment
that runs this script (the venv, resolved from pyproject.toml), so the GPU machine runs the versions the tests
here ran; one not installed here takes pyproject.toml's requirement (pip picks the newest that fits). Wheels are
for CPython 3.12 on manylinux x86-64, without dependencies (each one is listed).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

# Distribution -> why the GPU machine needs it. Dependencies that machine already has (anyio, h11, click, torch,
# torchvision, timm, huggingface-hub, regex, tqdm, safetensors, pytest, ...) are not brought.
WHEELS = {
    "fastapi": "the HTTP service",
    "starlette": "fastapi",
    "annotated-doc": "fastapi",
    "opentelemetry-api": "fastapi",
    "pydantic": "request models and Settings",
    "pydantic-core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typing-extensions": "pydantic needs a recent one; installed there only if the machine's is older",
    "pydantic-settings": "Settings",
    "python-dotenv": "pydantic-settings",
    "uvicorn": "the server of the /classify benchmark",
    "httptools": "uvicorn[standard]'s HTTP parser, as served in production",
    "python-multipart": "multipart /classify",
    "redis": "the label cache client (imported even without a Redis)",
    "ftfy": "the tokenizer's text cleaning",
    "wcwidth": "ftfy",
    "open_clip_torch": "the random-init ViT-B-32 benchmark",
    "pytest-asyncio": "the async tests",
}
PYTHON_VERSION = "3.12"
# pip matches manylinux tags exactly: offer every glibc baseline the machine's (glibc 2.35+) loader accepts.
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
)
LIMIT_MIB = 40.0  # the check's whole working tree travels in 64 MiB


PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_requirements(path: Path = PYPROJECT) -> dict[str, str]:
    """Canonical name -> requirement string, from the dependencies and every extra."""
    project = tomllib.loads(path.read_text())["project"]
    lines = [
        *project.get("dependencies", []),
        *(r for extra in project.get("optional-dependencies", {}).values() for r in extra),
    ]
    requirements = {}
    for line in lines:
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if name:
            requirements[_canonical(name.group())] = re.sub(r"\[[^]]*\]", "", line.split(";")[0]).strip()
    return requirements


def pins(names: dict[str, str] = WHEELS, requirements: dict[str, str] | None = None) -> list[str]:
    """NAME==VERSION, the version installed here; else pyproject.toml's requirement for NAME."""
    requirements = pyproject_requirements() if requirements is None else requirements
    missing, result = [], []
    for name in names:
        try:
            result.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            fallback = requirements.get(_canonical(name))
            if fallback is None:
                missing.append(name)
            else:
                print(f"  {name} is not installed here: taking pyproject.toml's {fallback!r}", flush=True)
                result.append(fallback)
    if missing:
        raise SystemExit(
            f"not installed in {sys.executable} and not in pyproject.toml: {', '.join(missing)}; run this with "
            "the test venv (make .venv/.test-installed), whose versions are the ones pinned"
        )
    return result


def pip_download_command(requirements: list[str], dest: Path) -> list[str]:
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(dest),
        *requirements,
    ]


def download(dest: Path, limit_mib: float = LIMIT_MIB) -> int:
    requirements = pins()
    # Into a fresh folder, swapped in only when complete: two versions of one package would stop the install.
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    print(f"downloading {len(requirements)} wheels for CPython {PYTHON_VERSION} manylinux x86-64 ...", flush=True)
    result = subprocess.run(pip_download_command(requirements, staging))
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        print("pip download failed (is PyPI reachable from here?)", file=sys.stderr)
        return result.returncode
    shutil.rmtree(dest, ignore_errors=True)
    staging.replace(dest)
    wheels = sorted(dest.glob("*.whl"))
    total = sum(wheel.stat().st_size for wheel in wheels)
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / 1024:8.0f} KiB  {wheel.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {dest}")
    if total > limit_mib * 2**20:
        print(f"over the {limit_mib:g} MiB budget for carried wheels", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"), help="folder to fill (replaced whole)")
    parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="fail above this total size")
    args = parser.parse_args(argv)
    return download(args.dest, args.limit_mib)


if __name__ == "__main__":
    sys.exit(main())
