"""A private Docker engine and stand-in base images, so the images and the compose stack are really built and run.

No container registry can be reached from the machines this project is built on, and the host's firewall must not
change. So the tests start a dockerd of their own (own data root, exec root and socket; no bridge, no iptables;
everything on host networking) and make the third-party images the Dockerfile and the compose file name from
Debian packages: `debootstrap` a bookworm root with Python and import it as the Dockerfile's base image, then
build a Redis image on top of it under the compose file's Redis name. Only the tests do this; the Dockerfile and
the compose file stay what a user runs against the real images.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DOCKER = "/usr/bin/docker"  # Debian's client: BuildKit built in (a client-only docker earlier on PATH may lack it)
DOCKERD = "/usr/sbin/dockerd"
COMPOSE = "/usr/bin/docker-compose"
BASE_IMAGE = "python:3.11-slim-bookworm"  # the Dockerfile's PYTHON_IMAGE
REDIS_IMAGE = "redis:7.2"  # docker-compose.yml's redis image
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
SUITE = "bookworm"
CACHE_DIR = Path(os.environ.get("CLIPSERVE_DOCKER_CACHE", "/var/cache/clipserve-docker-tests"))
HOST_EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")

REDIS_STANDIN_DOCKERFILE = f"""
FROM {BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*
CMD ["redis-server"]
"""


def missing_tools() -> list[str]:
    """What this machine lacks to run the Docker tests (an install hint each)."""
    needs = {DOCKER: "docker.io", DOCKERD: "docker.io", COMPOSE: "docker-compose", "debootstrap": "debootstrap"}
    missing = [f"{path} (apt-get install {package})" for path, package in needs.items() if not shutil.which(path)]
    if os.geteuid() != 0:
        missing.append("root (dockerd and debootstrap need it)")
    return missing


def _run_unchecked(command: Sequence[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, **kwargs)


def _run(command: Sequence[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = _run_unchecked(command, timeout, **kwargs)
    if result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{output}")
    return result


class PrivateDocker:
    """A dockerd of the tests' own, with host networking only; `stop` removes every trace of it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="clipserve-docker-"))
        self.socket = self.root / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1"}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> None:
        log = open(self.root / "dockerd.log", "wb")  # noqa: SIM115 - dockerd writes to it until stop()
        self.process = subprocess.Popen(
            [
                DOCKERD,
                f"--data-root={self.root / 'data'}",
                f"--exec-root={self.root / 'exec'}",
                f"--pidfile={self.root / 'dockerd.pid'}",
                f"--host=unix://{self.socket}",
                # Default networking would create docker0 and rewrite the host firewall (FORWARD policy DROP).
                "--bridge=none",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while subprocess.run([DOCKER, "info"], env=self.env, capture_output=True).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 3000) -> str:
        path = self.root / "dockerd.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def __call__(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run the docker client against this daemon."""
        return self._client(DOCKER, args, **kwargs)

    def compose(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run docker-compose against this daemon; `env` adds variables (the compose file's settings)."""
        return self._client(COMPOSE, args, **kwargs)

    def _client(
        self,
        program: str,
        args: Sequence[str],
        *,
        timeout: float = 600,
        check: bool = True,
        env: dict[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        command = [program, *args]
        run = _run if check else _run_unchecked
        return run(command, timeout, env={**self.env, **(env or {})}, input=input)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            containers = self("ps", "-aq", check=False).stdout.split()
            if containers:
                self("rm", "-f", *containers, check=False, timeout=120)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        # Mounts dockerd leaves behind (the host network namespace, overlay layers) would stop rmtree.
        for mount_point in sorted(_mounts_under(self.root), reverse=True):
            subprocess.run(["umount", "-l", mount_point], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _mounts_under(root: Path) -> list[str]:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    return [fields[1] for fields in map(str.split, mounts) if fields[1].startswith(f"{root}/")]


def _debian_mirror() -> str:
    """The mirror apt uses here, so the stand-in comes from the same place as the host's packages."""
    for source in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if source.exists():
            match = re.search(r"(?:URIs:|deb)\s+(https?://\S+/debian)\b", source.read_text())
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


def base_rootfs_tarball(progress=print) -> Path:  # type: ignore[no-untyped-def]
    """A bookworm root with Python that trusts this host's CA certificates, as a tarball, cached between runs."""
    host_cas = sorted(HOST_EXTRA_CA_DIR.glob("*.crt")) if HOST_EXTRA_CA_DIR.is_dir() else []
    recipe = "\n".join([SUITE, *BASE_PACKAGES, *(hashlib.sha256(p.read_bytes()).hexdigest() for p in host_cas)])
    tarball = CACHE_DIR / f"standin-{SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.tar"
    if tarball.exists():
        progress(f"stand-in base: cached {tarball}")
        return tarball
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="standin-root-", dir=CACHE_DIR))
    try:
        start = time.monotonic()
        progress(f"stand-in base: debootstrap {SUITE} from {_debian_mirror()} (about a minute, once)")
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(root),
                _debian_mirror(),
            ],
            timeout=900,
        )
        # pip inside an image build reaches the package index only if the image trusts what the host trusts
        # (this network may inspect TLS with its own CA). Test set-up only; never part of the Dockerfile.
        for certificate in host_cas:
            shutil.copy(certificate, root / "usr/local/share/ca-certificates" / certificate.name)
        _run(["chroot", str(root), "update-ca-certificates"], timeout=120)
        _run(["chroot", str(root), "apt-get", "clean"], timeout=120)
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        partial = tarball.with_suffix(".partial")
        _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], timeout=600)
        partial.rename(tarball)
        progress(f"stand-in base: built {tarball} in {time.monotonic() - start:.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tarball


def load_standin_images(docker: PrivateDocker, progress=print) -> None:  # type: ignore[no-untyped-def]
    """Make BASE_IMAGE and REDIS_IMAGE exist in `docker`, built from Debian packages."""
    tarball = base_rootfs_tarball(progress)
    docker(
        "import",
        "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change", "ENV LANG=C.UTF-8",
        "--change", 'CMD ["python3"]',
        str(tarball),
        BASE_IMAGE,
        timeout=300,
    )  # fmt: skip
    start = time.monotonic()
    docker("build", "--network=host", "-t", REDIS_IMAGE, "-", input=REDIS_STANDIN_DOCKERFILE, timeout=600)
    progress(f"stand-in {REDIS_IMAGE}: built from Debian's redis-server in {time.monotonic() - start:.0f} s")
